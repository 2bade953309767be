"""`medi <command>`: one thin entry point per pipeline stage (each DVC stage calls one of these).

Every command reads `params.yaml` once into typed config, runs its stage inside an MLflow run, and turns
bad input (`MediError`) into a one-line message and exit status 2.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from medi import allocator
from medi import config as config_mod
from medi import runtime
from medi.config import Config
from medi.errors import MediError

log = logging.getLogger("medi")


def cmd_synthesize(cfg: Config, args: argparse.Namespace) -> None:
    from medi import synthetic

    synthetic.run_stage(cfg, workers=args.workers)


def cmd_prepare(cfg: Config, args: argparse.Namespace) -> None:
    from medi import data

    data.run_stage(cfg)


def cmd_split(cfg: Config, args: argparse.Namespace) -> None:
    from medi import splits

    splits.run_stage(cfg)


def cmd_check(cfg: Config, args: argparse.Namespace) -> None:
    """Validate params and, for real data, that the input exists (run by `make repro` before `dvc repro`)."""
    from medi import data

    if cfg.data.source == "tcga_ut":
        tiles, meta = data.dataset_paths(cfg)
        log.info("real data found: %s and %s", tiles, meta)
    log.info(allocator.describe())
    log.info("params OK (%s, data.source=%s, classes=%s)", cfg.source_path, cfg.data.source, ",".join(cfg.classes))


def cmd_fetch_tcga_ut(cfg: Config, args: argparse.Namespace) -> None:
    from medi import download

    classes = args.classes or cfg.data.classes
    counts = download.fetch_classes(classes, cfg.class_folders, Path(args.data_dir), keep_zips=args.keep_zips)
    log.info("fetched %d tiles: %s; now run `dvc add %s` (make tcga-ut does)", sum(counts.values()), counts,
             args.data_dir)


def cmd_train(cfg: Config, args: argparse.Namespace) -> None:
    from medi import train

    if args.seed is not None:         # another generator of the same model (probe.generator_seeds)
        cfg, args.model = config_mod.with_generator(cfg, args.model, args.seed)
    hooks = []
    if cfg.train.eval_every > 0:      # the FID curve, in the feature space of params `fid`
        import numpy as np

        from medi import artifacts, fidelity

        if artifacts.has_split(cfg):
            hooks.append((cfg.train.eval_every, fidelity.curve_hook(cfg, args.model, artifacts.train_frame(cfg),
                                                               np.asarray(artifacts.load_tiles(cfg.data.output)))))
    train.run_stage(cfg, args.model, extra_hooks=hooks)


def cmd_sample(cfg: Config, args: argparse.Namespace) -> None:
    from medi import sample

    if args.from_manifest:
        result = sample.regenerate_stage(cfg, args.model, args.from_manifest, args.output)
        if result["identical"] != result["compared"]:
            raise MediError(f"{result['compared'] - result['identical']} of {result['compared']} regenerated images "
                            f"differ from the files beside {args.from_manifest}")
        return
    if args.model_uri:                # a registered model (or any MLflow model of medi), from the tracking store
        import tempfile

        from medi import registry, tracking

        tracking.configure(cfg.tracking)
        with tempfile.TemporaryDirectory() as tmp:
            sample.run_stage(cfg, args.model, registry.download(args.model_uri, Path(tmp)), args.model_uri)
        return
    sample.run_stage(cfg, args.model)


def cmd_fid(cfg: Config, args: argparse.Namespace) -> None:
    from medi import fid

    fid.run_stage(cfg, args.model)


def cmd_probe(cfg: Config, args: argparse.Namespace) -> None:
    from medi import distributed, probe

    if not distributed.is_main():     # the other processes of a launch: their share of the embeddings and pools
        probe.prepare(cfg)
        return
    probe.run_stage(cfg)


def cmd_sweep(cfg: Config, args: argparse.Namespace) -> None:
    from medi import sweep

    sweep.run(cfg, args.trials, args.workers)


def cmd_report(cfg: Config, args: argparse.Namespace) -> None:
    from medi import report

    report.run_stage(cfg)


def cmd_profile(cfg: Config, args: argparse.Namespace) -> None:
    from medi import profile

    output = args.output or args.params
    changes = profile.apply(args.params, args.names, parse_overrides(args.set), output)
    for c in changes:
        log.info("%s: %s -> %s", c.key, c.old, c.new)
    log.info("profile %s: %d param(s) changed in %s (git diff %s shows them; DVC re-runs the stages that read them)",
             " + ".join(args.names), len(changes), output, output)


COMMANDS = {
    "synthesize": (cmd_synthesize, "render the synthetic TCGA-UT world (the embedded default dataset)"),
    "prepare": (cmd_prepare, "read TCGA-UT tiles + GDC metadata, pack tiles at training resolution"),
    "split": (cmd_split, "the train / holdout split by (TSS, demographics) groups"),
    "train": (cmd_train, "train a diffusion model (cls or medi), resuming from its last checkpoint"),
    "sample": (cmd_sample, "generate a sample set (PNGs + manifest) with a trained model, or regenerate one"),
    "fid": (cmd_fid, "FID / KID overall, per class and per site, and conditioning accuracy of a sample set"),
    "probe": (cmd_probe, "the linear probe under subpopulation shift (the paper's Table 1): none / cls / medi"),
    "report": (cmd_report, "comparison figures of the models (FID per class, real vs generated tiles per site)"),
    "sweep": (cmd_sweep, "an Optuna study over params sweep.space (continues on re-run), each trial an MLflow run"),
    "profile": (cmd_profile, "write a profile's params (profiles/NAME.yaml, e.g. paper: the authors' recipe) into params.yaml"),
    "check": (cmd_check, "validate params.yaml and the presence of the input data"),
    "fetch-tcga-ut": (cmd_fetch_tcga_ut, "download, verify and unpack TCGA-UT classes from Zenodo into data/"),
}


# Commands that split their work over the processes of `accelerate launch` / `torchrun` (docs/scaling.md).
LAUNCHABLE = ("train", "sample", "fid", "probe")
# ... and those that launch themselves on a CPU (params sample.processes): most of their time is sampling.
SELF_LAUNCHED = ("sample", "probe")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medi", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a param, e.g. --set data.resolution=64 (value parsed as YAML); repeatable")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        if name == "synthesize":
            p.add_argument("--workers", type=int, default=None, help="render processes (default: all cores)")
        if name in ("train", "sample", "fid"):
            p.add_argument("--model", required=True, help="a model of params model.variants, e.g. cls or medi")
        if name == "train":
            p.add_argument("--seed", type=int, default=None, help="train the model with this train.seed into "
                           "models/NAME-seedSEED (another generator for the probe: params probe.generator_seeds)")
        if name == "sample":
            p.add_argument("--from-manifest", metavar="PATH", help="regenerate the images of this manifest and check "
                           "them against the files beside it (bit for bit)")
            p.add_argument("--output", metavar="DIR", help="with --from-manifest: where to write (default: <set>_regenerated)")
            p.add_argument("--model-uri", metavar="URI", help="sample this MLflow model instead of models/NAME, e.g. "
                           "models:/medi-medi/3 (the Model Registry of the tracking store; NAME still names the output)")
        if name == "sweep":
            p.add_argument("--trials", type=int, default=None, help="trials to add (default: params sweep.trials)")
            p.add_argument("--workers", type=int, default=None, help="worker processes (default: params sweep.workers)")
        if name == "profile":
            p.add_argument("names", nargs="+", metavar="NAME", help="profiles/NAME.yaml (or a .yaml path), applied in order")
            p.add_argument("--output", metavar="FILE", help="write the resolved params here (default: the --params file)")
        if name == "fetch-tcga-ut":
            p.add_argument("--classes", nargs="*", help="project codes (default: params data.classes)")
            p.add_argument("--data-dir", default="data", help="folder versioned by data.dvc (default: data)")
            p.add_argument("--keep-zips", action="store_true", help="keep the verified zips in <data-dir>/.downloads")
    return parser


def parse_overrides(pairs: list[str]) -> dict:
    import yaml

    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise MediError(f"--set expects KEY=VALUE, got '{pair}'")
        out[key] = yaml.safe_load(value)
    return out


def main(argv: list[str] | None = None) -> int:
    """The `medi` command on ARGV (None: this process's command line, which alone may be relaunched)."""
    own_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    runtime.setup(logging.DEBUG if args.verbose else logging.INFO)
    try:
        if own_command_line:
            allocator.preload(argv)     # tcmalloc, where found: the same command again, faster on the CPU
        cfg = config_mod.load(args.params, parse_overrides(args.set))
        from medi import distributed

        if distributed.launched():
            if args.command not in LAUNCHABLE or getattr(args, "from_manifest", None):
                raise MediError(f"this command runs in one process; launch only {', '.join(LAUNCHABLE)} with "
                                "accelerate launch / torchrun (docs/scaling.md)")
            distributed.state()             # one process group for the whole command (gloo without CUDA)
        elif own_command_line and args.command in SELF_LAUNCHED and not getattr(args, "from_manifest", None):
            processes = distributed.cpu_processes(cfg.sample.processes)
            if processes > 1:
                distributed.relaunch(argv, processes)
        COMMANDS[args.command][0](cfg, args)
    except MediError as exc:
        print(f"medi {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
