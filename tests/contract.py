"""Keras as the oracle: every optimizer Keras exports, through distclip, against its own `apply` on one device.

Shared by the in-process tests (no strategy, MirroredStrategy) and the
2-process workers (MultiWorkerMirroredStrategy, horovodrun). For each case:
4 steps of random gradients on an embedding table, two kernels, a 4-D conv
kernel and a bias. The global norms of the steps are about 11, 0.2, 6 and 0.1
against a threshold of 1, so the threshold binds on steps 0 and 2 and not on 1
and 3. Replica r of n holds the share W[r] of the summed gradient (n*W[r] of
the mean under Horovod), so no replica alone holds the global gradient.

Reference: the same optimizer, built by the same factory, on plain variables
with no strategy: `tf.clip_by_global_norm` of the whole gradients, then its own
`apply`. distclip's variables and optimizer variables (slots, iterations, any
per-step state) must equal the reference's to RTOL.
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

import keras
import numpy as np
import tensorflow as tf

import distclip
import reference_agc
from reference_zclip import ReferenceZClip

CLIP = 1.0
STEPS = 4
MAGNITUDES = (1.0, 0.02, 0.5, 0.01)
RTOL, ATOL = 1e-5, 1e-6
SHAPES = {"embedding": (10, 4), "dense_kernel": (4, 3), "dense_out": (3, 2), "conv_kernel": (3, 3, 2, 4),
          "bias": (3,)}
#: Share of the summed gradient held by each replica, by replica count.
SHARES = {1: [1.0], 2: [0.3, 0.7]}
APIS = ("ClipStep", "ClipOptimizer")


def _with_decay(cls, **kwargs):
    """The class with weight decay that spares biases (`exclude_from_weight_decay`)."""
    def make():
        opt = cls(learning_rate=0.05, weight_decay=0.05, **kwargs)
        opt.exclude_from_weight_decay(var_names=["bias"])
        return opt
    return make


#: Non-default options per exported class. A class missing here is built as
#: `cls(learning_rate=0.05)`, so an optimizer a later Keras adds is tested too.
FACTORIES: Dict[str, Callable[[], keras.optimizers.Optimizer]] = {
    "Adadelta": _with_decay(keras.optimizers.Adadelta, rho=0.9),
    "Adafactor": _with_decay(keras.optimizers.Adafactor, beta_2_decay=-0.7, clip_threshold=2.0),
    "Adagrad": _with_decay(keras.optimizers.Adagrad, initial_accumulator_value=0.2),
    "Adam": _with_decay(keras.optimizers.Adam, amsgrad=True),
    "AdamW": _with_decay(keras.optimizers.AdamW, amsgrad=True, beta_1=0.8),
    "Adamax": _with_decay(keras.optimizers.Adamax, beta_2=0.99),
    "Ftrl": lambda: keras.optimizers.Ftrl(0.05, l1_regularization_strength=0.01, l2_regularization_strength=0.01,
                                          l2_shrinkage_regularization_strength=0.01, beta=0.1),
    "Lamb": _with_decay(keras.optimizers.Lamb, beta_2=0.99),
    "Lion": _with_decay(keras.optimizers.Lion, beta_1=0.8),
    "Muon": lambda: keras.optimizers.Muon(0.05, weight_decay=0.1, adam_weight_decay=0.02, exclude_layers=["dense_out"]),
    "Nadam": _with_decay(keras.optimizers.Nadam, beta_1=0.8),
    "RMSprop": _with_decay(keras.optimizers.RMSprop, centered=True, momentum=0.5),
    "SGD": _with_decay(keras.optimizers.SGD, momentum=0.9, nesterov=True),
    "ScheduleFreeAdamW": _with_decay(keras.optimizers.ScheduleFreeAdamW, warmup_steps=2),
    # Wrappers, which take other optimizers.
    "LossScaleOptimizer": lambda: keras.optimizers.LossScaleOptimizer(
        keras.optimizers.Adam(0.05), initial_scale=16.0, dynamic_growth_steps=2),
    "MultiOptimizer": lambda: keras.optimizers.MultiOptimizer(keras.optimizers.OptimizerMap(
        keras.optimizers.SGD(0.05, momentum=0.9), {"dense_.*": keras.optimizers.Adam(0.05, amsgrad=True)})),
}
#: Exported, but no optimizer of its own: the abstract base class.
NOT_OPTIMIZERS = {"Optimizer"}
#: The non-finite skip is checked with these.
SKIP_CASES = ("Adam", "Nadam", "LossScaleOptimizer")
#: The ZClip case: Adam under `distclip.ZClip(**ZCLIP)`, whose threshold binds on step 2 (after 2 warm-up steps).
ZCLIP = dict(z_thresh=0.05, warmup_steps=2, max_grad_norm=None)
#: The AGC case: `distclip.AGC(AGC_CLIPPING)` clips every unit on step 0, some on step 2, none on steps 1 and 3.
AGC_CLIPPING = 1.0
#: The groups case: `distclip.ClipGroups` of the embedding (listed) at 0.1, the dense kernels (by pattern) at 3
#: and the rest (default) at 5, then 4 on top: every group and the global threshold bind on step 0, the
#: embedding alone on step 1, the embedding and the global one on step 2, nothing on step 3.
GROUPS = (([0], 0.1), ([1, 2], 3.0), ([3, 4], 5.0))
GROUPS_GLOBAL = 4.0
#: Classes distclip refuses, with what its error must say (none today).
REFUSED: Dict[str, str] = {}


def exported() -> List[str]:
    """Every optimizer class `keras.optimizers` exports, found at run time."""
    return sorted(n for n, c in vars(keras.optimizers).items()
                  if inspect.isclass(c) and issubclass(c, keras.optimizers.Optimizer) and n not in NOT_OPTIMIZERS)


def factory(name: str) -> Callable[[], keras.optimizers.Optimizer]:
    return FACTORIES.get(name) or (lambda: getattr(keras.optimizers, name)(learning_rate=0.05))


def initial_values() -> Dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {k: rng.normal(size=s).astype("float32") * 0.5 for k, s in SHAPES.items()}


def full_gradients(step: int) -> List[np.ndarray]:
    rng = np.random.default_rng(100 + step)
    return [(rng.normal(size=s) * MAGNITUDES[step]).astype("float32") for s in SHAPES.values()]


def make_variables(constrained: bool = False) -> List[keras.Variable]:
    """The variables; `constrained`: the kernels are kept non-negative (`variable.constraint`, as layers set it)."""
    variables = [keras.Variable(v, name=k) for k, v in initial_values().items()]
    for v in variables:
        if constrained and "kernel" in v.name:
            v.constraint = keras.constraints.NonNeg()
    return variables


def loss_scale_of(optimizer) -> float:
    """The factor the loss (so every gradient) is multiplied by: a LossScaleOptimizer's dynamic scale, else 1."""
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer) and optimizer.built:
        return float(np.asarray(optimizer.dynamic_scale.numpy()))
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        return float(optimizer.initial_scale)
    return 1.0


def reference(name: str, steps: int = STEPS, poison: Optional[int] = None, constrained: bool = False,
              thresholds: Optional[List[float]] = None, agc: Optional[float] = None,
              seen: Optional[List[Tuple[List[int], float]]] = None, groups: bool = False):
    """Single device: clip the whole gradients (at CLIP, or at `thresholds[step]`), then the optimizer's own
    apply. Returns (variables, optimizer).

    With `agc` (lambda), each unit is first clipped against the variables' values (`reference_agc`, numpy),
    and `seen` gets, per step, the elements in clipped units per variable and the norm after. With `groups`,
    each of GROUPS is clipped by `tf.clip_by_global_norm` at its threshold first, and `seen` gets, per step,
    the groups' norms before and the norm after.

    Step `poison` has a NaN gradient: a LossScaleOptimizer gets it (Keras's own
    skip: the scale halves); any other optimizer is not called at all.
    """
    variables, optimizer = make_variables(constrained), factory(name)()
    for step in range(steps):
        grads = [tf.constant(g) for g in full_gradients(step)]
        if step == poison:
            if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
                optimizer.apply([g + np.nan for g in grads], variables)
            continue
        if agc is not None:
            grads, counts = reference_agc.agc(grads, [v.numpy() for v in variables], agc)
            grads = [tf.constant(g, tf.float32) for g in grads]
            if seen is not None:
                seen.append((counts, float(tf.linalg.global_norm(grads))))
        if groups:
            grads, norms = list(grads), []
            for members, threshold in GROUPS:
                clipped_group, norm = tf.clip_by_global_norm([grads[i] for i in members], threshold)
                norms.append(float(norm))
                for i, g in zip(members, clipped_group, strict=True):
                    grads[i] = g
            if seen is not None:
                seen.append((norms, float(tf.linalg.global_norm(grads))))
        clipped, _ = tf.clip_by_global_norm(grads, CLIP if thresholds is None else thresholds[step])
        scale = loss_scale_of(optimizer)
        optimizer.apply([g * scale for g in clipped], variables)
    return variables, optimizer


def inner_of(wrapper, api: str):
    return wrapper.optimizer if api == "ClipStep" else wrapper.inner_optimizer


class Run(NamedTuple):
    """One run through distclip: the variables, the optimizer distclip wrapped, the distclip object, the per-step
    norms, and per step the values of the variables and the optimizer's variables after it."""
    variables: List[keras.Variable]
    optimizer: keras.optimizers.Optimizer
    wrapper: object
    norms: List[float]
    history: List[List[np.ndarray]]


def run_distclip(name: str, api: str, lazy: bool, strategy=None, replica: int = 0, replicas: int = 1,
                 mean: bool = False, steps: int = STEPS, poison: Optional[int] = None, constrained: bool = False,
                 clip_norm: Any = CLIP, agc: Optional[float] = None, groups: bool = False) -> Run:
    """The same steps through distclip under `strategy` (None: Horovod or no strategy, this process is `replica`)."""
    scope = strategy.scope() if strategy is not None else contextlib.nullcontext()
    with scope:
        variables, optimizer = make_variables(constrained), factory(name)()
        options = {} if agc is None else {"agc": distclip.AGC(agc)}
        if groups:  # the embedding by the variable itself, the dense kernels by a pattern on their paths
            clip_norm = distclip.ClipGroups([distclip.VariableGroup("embedding", GROUPS[0][1], variables=variables[:1]),
                                             distclip.VariableGroup("dense", GROUPS[1][1], patterns=["dense_.*"])],
                                            default=GROUPS[2][1], global_clip_norm=GROUPS_GLOBAL)
        if api == "ClipStep":
            wrapper = distclip.ClipStep(optimizer, clip_norm, **options)
        else:
            wrapper = distclip.keras.ClipOptimizer(optimizer, clip_norm, **options)
        if not lazy:
            wrapper.build(variables)

    @tf.function
    def replica_step(*grads):
        return wrapper.apply(list(grads), variables).global_norm

    def step(grads_of_replica):
        if strategy is None:
            return float(replica_step(*grads_of_replica(replica)))
        per_var = [strategy.experimental_distribute_values_from_function(
            lambda ctx, i=i: tf.constant(grads_of_replica(ctx.replica_id_in_sync_group)[i]))
            for i in range(len(SHAPES))]
        out = strategy.run(replica_step, args=tuple(per_var))
        return float(strategy.experimental_local_results(out)[0])

    norms, history = [], []
    for s in range(steps):
        full, scale = full_gradients(s), loss_scale_of(optimizer)
        share = SHARES[replicas]

        def grads_of_replica(r, full=full, scale=scale, s=s):
            factor = share[r] * (replicas if mean else 1) * scale
            grads = [g * factor for g in full]
            if s == poison and r == replicas - 1:
                grads[1] = grads[1].copy()
                grads[1][0, 0] = np.nan
            return grads

        norms.append(step(grads_of_replica))
        history.append(values(variables + optimizer.variables))
    return Run(variables, optimizer, wrapper, norms, history)


def values(variables) -> List[np.ndarray]:
    return [np.array(v.numpy() if hasattr(v, "numpy") else v) for v in variables]


def mismatches(got_vars, got_opt, ref_vars, ref_opt) -> List[str]:
    """What differs from the reference beyond RTOL/ATOL, by variable path."""
    out = []
    got_o, ref_o = got_opt.variables, ref_opt.variables
    if len(got_o) != len(ref_o):
        return [f"{len(got_o)} optimizer variables, reference has {len(ref_o)}"]
    for g, r in zip(list(got_vars) + list(got_o), list(ref_vars) + list(ref_o)):
        a, b = np.asarray(g.numpy(), "float64"), np.asarray(r.numpy(), "float64")
        if a.shape != b.shape or not np.allclose(a, b, rtol=RTOL, atol=ATOL, equal_nan=True):
            err = float(np.max(np.abs(a - b))) if a.shape == b.shape else "shape"
            out.append(f"{r.path}: max abs diff {err}")
    return out


def check_case(name: str, api: str, lazy: bool, constrained: bool = False,
               **backend) -> Tuple[List[str], Optional[Run]]:
    """(what differs from the reference, an empty list when nothing does; the run, None for a refused class).

    A class in REFUSED must be refused with an error naming it and the feature.
    """
    if name in REFUSED:
        try:
            run_distclip(name, api, lazy, steps=1, **backend)
        except distclip.ArgumentError as e:
            return ([] if REFUSED[name] in str(e) and name in str(e) else [f"refused with an unclear error: {e}"]), None
        return ["not refused"], None
    ref_vars, ref_opt = reference(name, constrained=constrained)
    run = run_distclip(name, api, lazy, constrained=constrained, **backend)
    if [n > CLIP for n in run.norms] != [True, False, True, False]:
        return [f"the threshold {CLIP} should bind on steps 0 and 2 only; norms {run.norms}"], run
    return mismatches(run.variables, run.optimizer, ref_vars, ref_opt), run


def check_skip(name: str, api: str, lazy: bool, **backend) -> Tuple[List[str], Run]:
    """A NaN on one replica at step 2: nothing changes at that step, bit for bit, except a loss scale,
    which halves; `skipped_steps` is 1; the run then equals the reference without that step."""
    ref_vars, ref_opt = reference(name, poison=2)
    run = run_distclip(name, api, lazy, poison=2, **backend)
    got_vars, got_opt, wrapper, norms, history = run
    out = mismatches(got_vars, got_opt, ref_vars, ref_opt)
    paths = [v.path for v in got_vars + got_opt.variables]
    changed = [p for p, a, b in zip(paths, history[1], history[2]) if not np.array_equal(a, b)]
    if isinstance(got_opt, keras.optimizers.LossScaleOptimizer):  # the scale halves, its counter restarts
        allowed, required = {got_opt.dynamic_scale.path, got_opt.step_counter.path}, {got_opt.dynamic_scale.path}
    else:
        allowed = required = set()
    if not required <= set(changed) <= allowed:
        out.append(f"the skipped step changed {changed}")
    if np.isfinite(norms[2]) or int(wrapper.skipped_steps.numpy()) != 1:
        out.append(f"norm {norms[2]}, skipped_steps {int(wrapper.skipped_steps.numpy())}")
    return out, run


def check_zclip(name: str, api: str, lazy: bool, **backend) -> Tuple[List[str], Run]:
    """`distclip.ZClip(**ZCLIP)` equals, on one device, `tf.clip_by_global_norm` at the thresholds of its
    reference code (reference_zclip.py) fed the whole gradients' norms, then the optimizer's own apply."""
    zclip = ReferenceZClip(**ZCLIP)
    norms = [float(np.sqrt(sum(np.sum(np.square(g, dtype=np.float64)) for g in full_gradients(s))))
             for s in range(STEPS)]
    thresholds = [zclip.step(n) for n in norms]
    ref_vars, ref_opt = reference(name, thresholds=thresholds)
    run = run_distclip(name, api, lazy, clip_norm=distclip.ZClip(**ZCLIP), **backend)
    out = mismatches(run.variables, run.optimizer, ref_vars, ref_opt)
    if [n > t for n, t in zip(norms, thresholds)] != [False, False, True, False]:
        out.append(f"ZClip should clip step 2 only; norms {norms}, thresholds {thresholds}")
    return out, run


def check_agc(name: str, api: str, lazy: bool, **backend) -> Tuple[List[str], Run]:
    """`distclip.AGC(AGC_CLIPPING)` with the global clip at CLIP equals, on one device, numpy's unit-wise clip
    (`reference_agc`) then `tf.clip_by_global_norm`, then the optimizer's own apply; the norms it reports are
    those after the unit-wise clip."""
    seen: List[Tuple[List[int], float]] = []
    ref_vars, ref_opt = reference(name, agc=AGC_CLIPPING, seen=seen)
    run = run_distclip(name, api, lazy, agc=AGC_CLIPPING, **backend)
    out = mismatches(run.variables, run.optimizer, ref_vars, ref_opt)
    counts = [counts for counts, _ in seen]
    sizes = [int(np.prod(s)) for s in SHAPES.values()]
    if counts[0] != sizes or not 0 < sum(counts[2]) < sum(sizes) or any(counts[1] + counts[3]):
        out.append(f"AGC should clip every unit on step 0, some on step 2, none on 1 and 3; clipped {counts}")
    if not np.allclose(run.norms, [norm for _, norm in seen], rtol=RTOL):
        out.append(f"the norms after AGC: {run.norms}, reference {[norm for _, norm in seen]}")
    if [n > CLIP for _, n in seen] != [True, False, True, False]:
        out.append(f"the threshold {CLIP} should bind after AGC on steps 0 and 2; norms {seen}")
    return out, run


def check_groups(name: str, api: str, lazy: bool, **backend) -> Tuple[List[str], Run]:
    """`distclip.ClipGroups` (GROUPS, GROUPS_GLOBAL on top) equals, on one device, `tf.clip_by_global_norm` of
    each group, then of all at GROUPS_GLOBAL, then the optimizer's own apply; the norm it reports is the one
    after the groups' clip, and its groups' norms and scales are the reference's."""
    seen: List[Tuple[List[float], float]] = []
    ref_vars, ref_opt = reference(name, thresholds=[GROUPS_GLOBAL] * STEPS, groups=True, seen=seen)
    run = run_distclip(name, api, lazy, groups=True, **backend)
    out = mismatches(run.variables, run.optimizer, ref_vars, ref_opt)
    bound = [[n > c for n, (_, c) in zip(norms, GROUPS, strict=True)] + [after > GROUPS_GLOBAL] for norms, after in seen]
    if bound != [[True] * 4, [True, False, False, False], [True, False, False, True], [False] * 4]:
        out.append(f"the groups should bind as GROUPS says; reference norms {seen}")
    if not np.allclose(run.norms, [after for _, after in seen], rtol=RTOL):
        out.append(f"the norms after the groups' clip: {run.norms}, reference {[after for _, after in seen]}")
    latest = run.wrapper._update.state  # the last step's groups, as the reporter reads them
    norms, scales = latest.group_norms.numpy(), latest.group_scales.numpy()
    want = np.array(seen[-1][0])
    if not (np.allclose(norms, want, rtol=RTOL) and np.allclose(scales, np.minimum(1, [c for _, c in GROUPS] / want),
                                                                 rtol=RTOL)):
        out.append(f"the last step's group norms {norms} and scales {scales}; reference norms {want}")
    return out, run


def all_cases():
    return [(name, api, lazy) for name in exported() for api in APIS for lazy in (False, True)]


#: The optimizer run in every (API, built lazily or not) variant across processes.
EVERY_VARIANT = "Adam"


def across_processes_cases():
    """The cases the 2-process workers run: ("match", "skip", "zclip", "agc" or "groups", name, API, lazy).

    Every exported optimizer once, in one of the four (API, lazy) variants in turn, and EVERY_VARIANT in all four;
    each SKIP_CASES optimizer skipping a step through both APIs, lazily for one and built beforehand for the
    other. The full cross product runs in one process under MirroredStrategy and without a strategy
    (tests/unit/test_optimizer.py): what depends on the optimizer (its slots, its own `apply`, building it
    lazily inside the step) is the same code whatever keeps the replicas identical, while what depends on the
    engine (the collective, the variables it mirrors, lazy creation inside a multi-worker replica context) runs
    here in every variant, through EVERY_VARIANT and the rotation."""
    variants = [(api, lazy) for api in APIS for lazy in (False, True)]
    cases = []
    for i, name in enumerate(exported()):
        chosen = variants if name == EVERY_VARIANT else [variants[i % len(variants)]]
        cases += [("match", name, api, lazy) for api, lazy in chosen]
    for i, name in enumerate(SKIP_CASES):
        cases += [("skip", name, api, bool((i + j) % 2)) for j, api in enumerate(APIS)]
    cases += [("zclip", EVERY_VARIANT, api, api == "ClipOptimizer") for api in APIS]
    cases += [("agc", EVERY_VARIANT, api, api == "ClipStep") for api in APIS]
    cases += [("groups", EVERY_VARIANT, api, api == "ClipOptimizer") for api in APIS]
    return cases

