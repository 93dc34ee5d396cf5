"""One module per revision, named `NNNN_what.py`, whose revision id is the module's name."""
