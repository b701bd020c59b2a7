"""Training drafts by distillation from a target: the data the target writes, the independent draft (a few of
the target's own layers) and the feature draft (EAGLE-3 style, trained with training-time test).

    config.py       DistillConfig: what a `gsd-serve distill` run does
    loop.py         what both trainers share: progress, batches, the learning-rate schedule, checkpoints
    data.py         phase 1: the target's answers with its top-k distributions, the held-out split, the vocabulary
    independent.py  phase 2 of an independent draft: training, and its repository form
    features.py     phases 2 and 3 of a feature draft: the target's features, training-time test
    distill.py      run(): the phases a DistillConfig asks for, in order

May import gsd_serve.core and gsd_serve.models. Never imports gsd_serve.serving, gsd_serve.tools or
gsd_serve.cli (the `gsd-serve distill` command in cli/distill.py parses its arguments and calls run()).
"""
