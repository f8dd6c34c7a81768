"""The example application: `distclip train` (an RNN on the adding problem, clipped with ClipStep or, with
`--fit`, ClipOptimizer) and `distclip plot`. It imports the library and nothing in the library imports it.

    cli.py        the `distclip` command          runners.py   one step on every replica: tf.distribute or Horovod
    loop.py       the custom training loop        fit.py       the same job through model.fit
    checkpoint.py checkpoints, SIGTERM, --resume  summary.py   replicas checked, held-out error, summary.json
    adding.py     the data and the model          plots.py     plot.png from metrics.csv
"""
