"""How `distclip train` runs one step on every replica: under a tf.distribute strategy, or under Horovod.

Both give the loop the same thing: `step(x, y, stop)` on the *global* batch
(each replica takes its own slice), returning the global-mean loss and whether
any process passed `stop=True` (reduced together with the loss: no extra
collective), identical on every process. What the clip step saw is read from
its state (`distclip.ClipReporter`).
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Tuple

import tensorflow as tf

import distclip
from distclip import cluster

# replica_fn(x, y, loss_denominator) -> (loss, ClipResult); `loss` is this replica's share.
ReplicaFn = Callable[[tf.Tensor, tf.Tensor, float], Tuple[tf.Tensor, distclip.ClipResult]]


class _Processes:
    """What both runners ask of the library's backend (`distclip.cluster.current_backend`) between steps."""

    backend: Any  # distclip.cluster.current_backend()

    def agree(self, value: float, flag: bool) -> Tuple[float, bool]:
        """`value` averaged over processes, and whether `flag` is True on any (one all-gather for both;
        none in one process, whose values are everyone's already)."""
        if self.backend.size() == 1:
            return value, flag
        rows = self.backend.all_gather(lambda: tf.constant([value, float(flag)], tf.float64), "distclip_train_agree")
        return float(rows[:, 0].mean()), bool(rows[:, 1].max() > 0)

    def barrier(self) -> None:
        """Returns once every process got here (a collective; nothing to wait for in one process)."""
        self.agree(0.0, False)


class DistributeRunner(_Processes):
    """A tf.distribute strategy: per-replica loss divided by the global batch, SUM all-reduce."""

    def __init__(self, strategy: tf.distribute.Strategy):
        self.strategy = strategy
        self.replicas = strategy.num_replicas_in_sync
        with strategy.scope():
            self.backend = cluster.current_backend()
        self.chief = self.backend.rank() == 0
        # TensorFlow's rule for MultiWorkerMirroredStrategy: every worker saves (the others to scratch).
        self.saves_on_every_worker = isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
        if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
            self.name = "MultiWorkerMirroredStrategy"
        elif not tf.distribute.has_strategy() and strategy is tf.distribute.get_strategy():
            self.name = "default strategy"
        else:
            self.name = type(strategy).__name__

    def scope(self):
        return self.strategy.scope()

    def broadcast(self, variables) -> None:
        distclip.broadcast_from_root(variables)  # a no-op: mirrored variables start identical

    def compile(self, replica_fn: ReplicaFn, global_batch: int):
        strategy, per = self.strategy, global_batch // self.replicas

        @tf.function
        def step(x, y, stop):
            def fn(x, y):
                loss, _ = replica_fn(x, y, float(global_batch))
                return tf.stack([loss, tf.cast(stop, loss.dtype)])

            loss_stop = strategy.run(fn, args=(x, y))
            loss, stop = tf.unstack(strategy.reduce(tf.distribute.ReduceOp.SUM, loss_stop, axis=None))
            return loss, stop > 0

        def shard(array):
            return strategy.experimental_distribute_values_from_function(
                lambda ctx: tf.constant(array[ctx.replica_id_in_sync_group * per:][:per])
            )

        return lambda x, y, stop: step(shard(x), shard(y), tf.constant(stop))

    def read(self, variable) -> int:
        return int(self.strategy.experimental_local_results(variable)[0].numpy())

    def local_rows(self, global_batch: int) -> slice:
        """The rows of a global batch this process feeds to `fit` (all: the strategy splits them)."""
        return slice(None)


class HorovodRunner(_Processes):
    """One replica per process: per-rank mean loss, Average all-reduce (`hvd.grouped_allreduce`)."""

    name = "Horovod"

    def __init__(self):
        import horovod.tensorflow as hvd

        hvd.init()
        cluster.pin_gpu(cluster.info())  # one GPU per process, by local rank
        self.hvd = hvd
        self.backend = cluster.current_backend()
        self.replicas = self.backend.num_replicas()
        self.chief = self.backend.rank() == 0
        self.saves_on_every_worker = False  # rank 0 saves, as Horovod users do

    def scope(self):
        return contextlib.nullcontext()

    def broadcast(self, variables) -> None:
        distclip.broadcast_from_root(variables, root=0)

    def compile(self, replica_fn: ReplicaFn, global_batch: int):
        hvd, per = self.hvd, global_batch // self.replicas
        rank = hvd.rank()

        @tf.function
        def step(x, y, stop):
            loss, _ = replica_fn(x, y, float(per))
            loss_stop = hvd.allreduce(tf.stack([loss, tf.cast(stop, loss.dtype)]), op=hvd.Average,
                                      name="distclip_train_loss")
            return loss_stop[0], loss_stop[1] > 0

        mine = slice(rank * per, (rank + 1) * per)
        return lambda x, y, stop: step(x[mine], y[mine], tf.constant(stop))

    def read(self, variable) -> int:
        return int(variable.numpy())

    def local_rows(self, global_batch: int) -> slice:
        per = global_batch // self.replicas
        return slice(self.backend.rank() * per, (self.backend.rank() + 1) * per)


def make_runner(strategy_name: str, replicas: int):
    """The runner for `--strategy`: "horovod", or a tf.distribute strategy by name."""
    if strategy_name == "horovod":
        return HorovodRunner()
    return DistributeRunner(cluster.make_strategy(strategy_name, replicas))
