"""`distclip train`'s flags: every integer has a range, and a flag that would be ignored is refused, as argparse
usage errors (status 2) before TensorFlow starts anything. The command itself runs in tests/scenarios/test_cli.py."""
import pytest

from distclip.train import cli


@pytest.mark.parametrize("flags, message", [
    (["--rewind-factor", "3"], "--rewind-factor set how --rewind detects a spike; without --rewind nothing would use"),
    (["--rewind-window", "10"], "--rewind-window set how --rewind detects a spike"),
    (["--steps", "40", "--nan-at", "5,999999"], "--nan-at 999999: beyond --steps 40 (steps are numbered 0 to 39)"),
    (["--steps", "40", "--spike-at", "40"], "--spike-at 40: beyond --steps 40"),
    (["--rewind", "99999999999999999999,2,1"],
     f"every must be an integer from 1 to {2 ** 62}; got every=99999999999999999999"),
    (["--rewind", "5,1000000000000,1"], f"keep must be an integer from 1 to {2 ** 16}; got keep=1000000000000"),
    (["--rewind", "5,2,1", "--rewind-window", "1"], "--rewind-window: must be an integer from 2 to"),
    (["--rewind", "5,x,1"], "--rewind must be EVERY,KEEP,SKIP (three integers); got '5,x,1'"),
    (["--steps", "99999999999999999999"], f"--steps: must be an integer from 1 to {2 ** 62}; got '99999999999999999999'"),
    (["--seed", "-1"], f"--seed: must be an integer from 0 to {2 ** 63 - 1}; got '-1'"),
    (["--length", "1"], "--length: must be an integer from 2 to 65536; got '1'"),
    (["--batch-size", "0"], "--batch-size: must be an integer from 1 to"),
    (["--replicas", "100000"], "--replicas: must be an integer from 1 to 4096"),
    (["--checkpoint-every", "-1"], "--checkpoint-every: must be an integer from 0 to"),
    (["--variable-norms-every", "1e3"], "--variable-norms-every: must be an integer from 0 to"),
    (["--nan-at", "-3"], f"expected step numbers from 0 to {2 ** 62} separated by commas, got '-3'"),
    (["--skip-spikes", "6"], "--skip-spikes must be ZSCORE,WINDOW (a number and an integer); got '6'"),
    (["--skip-spikes", "0,10"], "--skip-spikes 0,10: zscore must be None or a finite number > 0; got zscore=0.0"),
    (["--skip-spikes", "6,1"], "--skip-spikes 6,1: window must be an integer from 2 to"),
    (["--rewind", "5,2,1", "--skip-spikes", "6,10"], "--rewind and --skip-spikes are two answers to one spike"),
    (["--rewind-lr", "0.1,100"], "--rewind-lr set what follows a rewind; without --rewind nothing would use them"),
    (["--rewind-reset-moments"], "--rewind-reset-moments set what follows a rewind; without --rewind"),
    (["--rewind", "5,2,1", "--rewind-lr", "1.5,100"], "--rewind-lr 1.5,100): lr_factor must be a number > 0.0 and < "),
    (["--rewind", "5,2,1", "--rewind-lr", "0.1"], "--rewind-lr must be FACTOR,UPDATES (a number and an integer)"),
    (["--clip-norm", "zclp"], "--clip-norm must be a positive finite number, 'none' or a policy (autoclip, "
                              "spikeclip, zclip); got 'zclp'"),
    (["--agc", "0"], "--agc must be a finite number > 0 (AGC's clipping); got '0'"),
    (["--agc", "0.1", "--noise-scale"], "--agc changes each replica's gradient unit by unit, and --noise-scale"),
    (["--clip-group", "dense/.*"], "--clip-group must be PATTERN=THRESHOLD (a regular expression matching whole"),
    (["--clip-group", "dense(=0.5"], "--clip-group dense(=0.5: VariableGroup 'dense(': patterns holds 'dense(', not a "
                                     "regular expression"),
    (["--clip-group", ".*=0"], "--clip-group .*=0: clip_norm must be a positive finite number"),
    (["--clip-group", ".*=1", "--clip-group", ".*=2"], "groups must have distinct names; got '.*' more than once"),
    (["--clip-group", ".*=1", "--clip-norm", "zclip"], "--clip-group with --clip-norm zclip: with groups"),
    (["--clip-group", ".*=1", "--noise-scale"], "--clip-group scales each group's gradients on its own"),
    (["--resume", "--move-aside"], "--move-aside moves an earlier run's outputs away for a new run; --resume"),
])
def test_bad_or_ignored_flags_are_usage_errors(flags, message, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", *flags])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err


def test_the_rewind_flags_make_the_rewind_they_name():
    cfg = cli._check(cli.parser(), cli.parser().parse_args(
        ["train", "--rewind", "50,2,100", "--rewind-lr", "0.1,500", "--rewind-reset-moments"]))
    from distclip import Rewind

    assert cfg.rewind_config() == Rewind(every=50, keep=2, skip=100, factor=20.0, window=50, lr_factor=0.1,
                                         lr_updates=500, reset_moments=True)


def test_the_clip_group_flags_make_one_group_per_pattern_and_the_rest_at_clip_norm():
    cfg = cli._check(cli.parser(), cli.parser().parse_args(
        ["train", "--clip-group", ".*/recurrent_kernel=0.5", "--clip-group", "adding_rnn/dense/.*=2", "--clip-norm",
         "none"]))
    groups = cfg.threshold()
    assert [(g.name, g.clip_norm, g.patterns) for g in groups.groups] == [
        (".*/recurrent_kernel", 0.5, (".*/recurrent_kernel",)), ("adding_rnn/dense/.*", 2.0, ("adding_rnn/dense/.*",))]
    assert groups.default is None and groups.global_clip_norm is None and cfg.nonfinite == "skip"
