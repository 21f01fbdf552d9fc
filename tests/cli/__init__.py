"""Tests of the ``seqpar`` command line (run in-process through ``seqpar.cli.main``)."""
