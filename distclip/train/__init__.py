"""`distclip train`: the example job, an RNN on the adding problem, clipped with ClipStep."""
