"""Tools built on the library, not part of it: benchmarks that drive it end to end.

* :mod:`~lit_adamerging.benchmarks.mini`: the offline mini benchmark, the main job
  (``lit-adamerging-mini``, or ``python -m lit_adamerging.benchmarks.mini``): real data, real
  pretrained weights, every merging method, the README's results table;
* :mod:`~lit_adamerging.benchmarks.finetune`: the fine-tuning recipe that builds its zoo;
* :mod:`~lit_adamerging.benchmarks.step`: the training step against a plain forward and backward
  (``python -m lit_adamerging.benchmarks.step``);
* :mod:`~lit_adamerging.benchmarks.fit`: a whole fit through the Trainer, by cache mode
  (``python -m lit_adamerging.benchmarks.fit``).

The library never imports them.
"""
