"""What a run writes after each epoch (``reporters.py``: one reporter per output, called from one
place) and the pieces they use: the log (``log.py``), ``metrics.csv`` (``metrics_csv.py``),
``curves.png`` (``curves.py``) and TensorBoard (``tensorboard.py``). Nothing is imported here, so
importing one piece never imports the others."""
