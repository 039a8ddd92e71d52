"""The evaluation protocol: networks trained on a labelled set, tested on a held-out split."""
