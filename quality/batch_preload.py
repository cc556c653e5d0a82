"""Imported by the scoring workers' forkserver only (``batch_workers.PRELOAD``), never elsewhere: importing it is
its purpose, the one module here with an import-time effect. It builds what every scoring worker needs before its
first batch, the datatrove profile's spaCy tokenizer (0.3 s, up to 0.9 s on 2 busy cores), once, in the forkserver,
so that each worker forked from it, also the one that replaces a killed worker, starts warm in about 0.05 s."""

from prunefusion.quality.pipeline import warm_worker

warm_worker("datatrove")
