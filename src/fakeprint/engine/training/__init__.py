"""Training as a small package: ``train.train`` reads top to bottom and composes ``setup`` (processes, backends,
model, optimiser), ``data`` (the splits), ``loop`` (one epoch, one evaluation), ``ema``, ``distill``, ``statcache``
(statistics computed once) and ``run_folder`` (metrics.csv, resume points, curves)."""
