"""Transformer-XL language-model experiments with Top-KAST (paper Tables 2, 3, 5; App. A).

  python -m experiments.language_model.main --config=configs/demo.py --workdir=/tmp/demo

Files: ``main.py`` (flags, multi-process init), ``train.py`` (train/eval loop, dry run, workdir),
``models.py`` (Transformer-XL, adaptive input/softmax), ``input_pipeline.py`` (pystdlib, text,
enwik8, wikitext103 readers and stream batching), ``collect_table.py`` (markdown tables of runs).
"""
