"""MLPerf time to train, read from the MLPerf logs of one or more runs.

    python -m bench.mlperf_result runs/seed1/mlperf.log runs/seed2/mlperf.log ...
    python -m bench.mlperf_result benchmark-*.log --json results.json
    python -m bench.mlperf_result --time-to-train runs/seed1/mlperf.log   # just the seconds
    python -m bench.mlperf_result --status runs/seed1/mlperf.log          # success / aborted / ...

What is read: the ``:::MLLOG {json}`` lines that the mlperf-logging package writes (train.py
writes them to RUN_DIR/mlperf.log and echoes them to stdout, so the ``tee``'d console log of
run_and_time.sh works as well). Anything else on a line or between lines (progress bars,
warnings, shell trace) is ignored; a line whose JSON is cut short is counted and skipped.

Per run:
- time to train = run_stop.time_ms - run_start.time_ms, in seconds (the MLPerf definition:
  initialisation before run_start is not timed);
- status = run_stop's metadata ``status`` ("success" or "aborted"); "incomplete" when the log
  has no run_stop (the process was killed);
- epochs to converge = ``epoch_num`` of the first ``eval_accuracy`` at or above the target
  (``--target``; without it, of the last eval of a successful run, since train.py stops at
  the first eval that reaches the target); for a run that did not converge the table shows
  the last evaluated epoch instead, in parentheses;
- final accuracy = the value of the last ``eval_accuracy``; seed = the ``seed`` event.

A file holding several runs (e.g. the same RUN_DIR reused: mllog appends) is split at each new
``init_start`` / ``run_start``, and every run is reported.

Score over several runs, as MLPerf scores a benchmark: drop the fastest and the slowest run
and average the rest. A run that did not converge counts as the slowest, so one such run is
dropped; with more than one the result is invalid (score None). With fewer than 3 runs
nothing can be dropped: the mean of all runs is given, and the output says so. (MLPerf v0.5
asks for 5 runs of ResNet-50.)

As a library: ``parse_log(path)`` -> dict for the last run in a file, ``parse_runs(path)`` ->
list of dicts, ``score(results)`` -> dict.
"""

import argparse
import json
import math
import re
import sys

MLLOG_TAG = ":::MLLOG"
_TAG_RE = re.compile(re.escape(MLLOG_TAG) + r"\s*")
_DECODER = json.JSONDecoder()
MLPERF_RUNS = 5  # runs per result for ResNet-50 in MLPerf Training v0.5


# -- reading ------------------------------------------------------------------------------

def read_events(path):
    """All MLLOG events in the file at `path`, in file order.

    Returns (events, skipped): `events` a list of dicts with at least "key" (str) and
    "time_ms" (int or float, milliseconds since the epoch), plus "value", "event_type" and
    "metadata" (dict, {} when absent) as logged; `skipped` the number of MLLOG tags whose JSON
    could not be decoded (a line cut short or overwritten by another process's output).
    Text around a tag is ignored, so a tag in the middle of a progress-bar line is found.
    Raises ValueError when the file cannot be read.
    """
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError as exc:
        raise ValueError(f"log {path!r}: cannot read it ({exc.strerror or exc})") from None
    events, skipped = [], 0
    # Progress bars redraw with \r; treat it as a line break so a tag after one is seen.
    for line in text.replace("\r", "\n").split("\n"):
        for match in _TAG_RE.finditer(line):
            try:
                event, _ = _DECODER.raw_decode(line, match.end())
            except json.JSONDecodeError:
                skipped += 1
                continue
            if (not isinstance(event, dict) or not isinstance(event.get("key"), str)
                    or not isinstance(event.get("time_ms"), (int, float))):
                skipped += 1
                continue
            if not isinstance(event.get("metadata"), dict):
                event["metadata"] = {}
            events.append(event)
    return events, skipped


def split_runs(events):
    """Split one file's events into runs: a list of lists of events, in order.

    A new run begins at an ``init_start`` or ``run_start`` when the current run has already
    seen one of the same key (or an ``init_start`` after a ``run_start``). Events before the
    first of them (e.g. ``cache_clear``) belong to the first run.
    """
    runs, current, seen = [], [], set()
    for event in events:
        key = event["key"]
        starts_new = (key == "init_start" and (seen & {"init_start", "run_start"})) or \
                     (key == "run_start" and "run_start" in seen)
        if starts_new and current:
            runs.append(current)
            current, seen = [], set()
        current.append(event)
        seen.add(key)
    if current:
        runs.append(current)
    return runs


def summarise_run(events, target=None):
    """One run's figures from its events (one element of `split_runs`).

    Args:
        events: list of event dicts as returned by `read_events`.
        target: float in (0, 1] or None: the top-1 accuracy that counts as converged. None:
            trust run_stop's status and take the last eval of a successful run.
    Returns a dict: seed (int or None), status ("success" / "aborted" / "incomplete" / other
    logged status), converged (bool: status == "success"), time_to_train_s (float or None when
    run_start or run_stop is missing), init_s (init_start -> run_start, float or None),
    epochs_to_converge (number or None), last_epoch (epoch_num of the last eval, or None),
    final_accuracy / best_accuracy (float or None), evals (int), target (float or None),
    global_batch_size (int or None), warnings (list of str).
    """
    if target is not None:
        target = _check_target(target)
    first = {}
    last = {}
    evals = []
    for event in events:
        first.setdefault(event["key"], event)
        last[event["key"]] = event
        if event["key"] == "eval_accuracy" and isinstance(event.get("value"), (int, float)):
            evals.append((event["metadata"].get("epoch_num"), float(event["value"])))
    warnings = []
    run_start, run_stop = first.get("run_start"), last.get("run_stop")
    if run_stop is None:
        status = "incomplete"
        warnings.append("no run_stop: the run did not finish (killed, or the log was cut)")
    else:
        status = str(run_stop["metadata"].get("status", "unknown"))
    time_to_train = None
    if run_start is None:
        warnings.append("no run_start in the log")
    elif run_stop is not None:
        time_to_train = (run_stop["time_ms"] - run_start["time_ms"]) / 1000.0
        if time_to_train < 0:
            warnings.append("run_stop is logged before run_start")
    init_s = None
    if "init_start" in first and run_start is not None:
        init_s = (run_start["time_ms"] - first["init_start"]["time_ms"]) / 1000.0

    converged = status == "success"
    epochs_to_converge = None
    if target is not None:
        reached = [epoch for epoch, acc in evals if acc >= target]
        if reached:
            epochs_to_converge = reached[0]
        if converged and not reached:
            warnings.append(f"run_stop says success but no eval_accuracy reached {target}")
    elif converged and evals:
        epochs_to_converge = evals[-1][0]

    seed = last.get("seed", {}).get("value")
    batch = last.get("global_batch_size", {}).get("value")
    return {
        "seed": seed,
        "status": status,
        "converged": converged,
        "time_to_train_s": time_to_train,
        "init_s": init_s,
        "epochs_to_converge": epochs_to_converge,
        "last_epoch": evals[-1][0] if evals else None,
        "final_accuracy": evals[-1][1] if evals else None,
        "best_accuracy": max(acc for _, acc in evals) if evals else None,
        "evals": len(evals),
        "target": target,
        "global_batch_size": batch,
        "warnings": warnings,
    }


def parse_runs(path, target=None):
    """Every run in the log at `path`: a list of `summarise_run` dicts, each with "file"
    (str), "run_in_file" (1-based int) and "skipped_lines" (int) added.

    Raises ValueError when the file cannot be read or holds no MLLOG line.
    """
    events, skipped = read_events(path)
    if not events:
        raise ValueError(f"log {path!r}: no '{MLLOG_TAG} {{json}}' lines found "
                         f"(is it an MLPerf log written through mlperf_logging.mllog?)")
    results = []
    for index, run_events in enumerate(split_runs(events), start=1):
        result = summarise_run(run_events, target)
        result.update(file=str(path), run_in_file=index, skipped_lines=skipped)
        results.append(result)
    return results


def parse_log(path, target=None):
    """The last run in the log at `path` (see `parse_runs` for the dict and the errors)."""
    return parse_runs(path, target)[-1]


# -- scoring ------------------------------------------------------------------------------

def score(results):
    """The MLPerf-style score of several runs of one benchmark.

    Args:
        results: non-empty list of dicts with "time_to_train_s" (float or None) and
            "converged" (bool), e.g. from `parse_log`.
    Returns a dict: score_s (float, or None when the result is invalid), runs (int),
    converged (int), used (list of indices into `results` averaged), dropped (list of
    indices), method (str), notes (list of str).
    A run that did not converge (or has no time) counts as infinitely slow: with 3 or more
    runs one such run is dropped as the slowest, two or more make the result invalid; with
    fewer than 3 runs all are averaged, and any such run makes the result invalid.
    """
    if not isinstance(results, (list, tuple)) or not results:
        raise ValueError("score: results must be a non-empty list of run dicts")
    times = []
    for i, r in enumerate(results):
        if not isinstance(r, dict) or "converged" not in r or "time_to_train_s" not in r:
            raise ValueError(f"score: results[{i}] must be a dict with 'converged' and 'time_to_train_s'")
        ok = bool(r["converged"]) and r["time_to_train_s"] is not None
        times.append(float(r["time_to_train_s"]) if ok else math.inf)
    n = len(times)
    order = sorted(range(n), key=lambda i: times[i])  # stable: ties keep input order
    notes = []
    if n >= 3:
        dropped, used = [order[0], order[-1]], order[1:-1]
        method = "mean after dropping the fastest and the slowest run"
    else:
        dropped, used = [], order
        method = f"mean of all {n} run(s)"
        notes.append(f"fewer than 3 runs: nothing dropped, the mean of all {n} is given")
    if n != MLPERF_RUNS:
        notes.append(f"MLPerf v0.5 scores ResNet-50 over {MLPERF_RUNS} runs; this is {n}")
    failed = sum(1 for t in times if math.isinf(t))
    value = None
    if any(math.isinf(times[i]) for i in used):
        notes.append(f"{failed} run(s) did not converge: no valid result"
                     + (" (one may be dropped as the slowest, not more)" if n >= 3 else ""))
    else:
        value = sum(times[i] for i in used) / len(used)
        if failed:
            notes.append("the run that did not converge was dropped as the slowest")
    return {"score_s": value, "runs": n, "converged": n - failed, "used": sorted(used),
            "dropped": sorted(dropped), "method": method, "notes": notes}


# -- output -------------------------------------------------------------------------------

def _check_target(target):
    try:
        value = float(target)
    except (TypeError, ValueError):
        raise ValueError(f"target must be a number in (0, 1], got {target!r}") from None
    if not 0.0 < value <= 1.0:
        raise ValueError(f"target must be in (0, 1], got {value}")
    return value


def _fmt(value, spec, none="-"):
    return none if value is None else format(value, spec)


def format_table(results, summary=None):
    """The per-run table (and the score line when `summary` is given) as one str."""
    header = f"{'run':>3}  {'seed':>6}  {'status':<10}  {'time to train':>14}  {'epochs':>7}  " \
             f"{'final top-1':>11}  file"
    lines = [header, "-" * len(header)]
    for i, r in enumerate(results, start=1):
        if r["epochs_to_converge"] is not None:
            epochs = _fmt(r["epochs_to_converge"], "")
        elif r["last_epoch"] is not None:
            epochs = f"({r['last_epoch']})"
        else:
            epochs = "-"
        where = r["file"] + (f" #{r['run_in_file']}" if r["run_in_file"] > 1 else "")
        time_s = _fmt(r["time_to_train_s"], ".1f") + (" s" if r["time_to_train_s"] is not None else "  ")
        lines.append(f"{i:>3}  {_fmt(r['seed'], '')!s:>6}  {r['status']:<10}  {time_s:>14}  {epochs:>7}  "
                     f"{_fmt(r['final_accuracy'], '.4f'):>11}  {where}")
        for w in r["warnings"]:
            lines.append(f"     warning: {w}")
        if r["skipped_lines"]:
            lines.append(f"     warning: {r['skipped_lines']} MLLOG line(s) in {r['file']} could not be decoded")
    lines.append("(epochs in parentheses: the last evaluated epoch of a run that did not converge)")
    if summary is not None:
        if summary["score_s"] is None:
            lines.append(f"score: none ({summary['method']})")
        else:
            s = summary["score_s"]
            lines.append(f"score: {s:.1f} s = {s / 60:.2f} min ({summary['method']}; "
                         f"runs used: {', '.join(str(i + 1) for i in summary['used'])})")
        for note in summary["notes"]:
            lines.append(f"note: {note}")
    return "\n".join(lines)


def main(argv=None):
    """Command line; returns the exit status (0 fine, 1 the asked-for figure is missing, 2 bad input)."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.mlperf_result",
        description="Time to train (run_start -> run_stop), epochs to converge and the MLPerf-style "
                    "score (drop fastest and slowest, average the rest) from MLPerf logs.")
    parser.add_argument("logs", nargs="+", metavar="LOG", help="MLPerf log files (mlperf.log or a console log)")
    parser.add_argument("--target", type=float, default=None,
                        help="top-1 accuracy that counts as converged, for epochs to converge "
                             "(default: trust run_stop's status; train.py's default target is 0.749)")
    parser.add_argument("--json", metavar="PATH", help="also write the runs and the score as JSON ('-' for stdout)")
    only = parser.add_mutually_exclusive_group()
    only.add_argument("--time-to-train", action="store_true",
                      help="print only the time to train in seconds of the last run in the one LOG")
    only.add_argument("--status", action="store_true",
                      help="print only the status (success/aborted/incomplete) of the last run in the one LOG")
    args = parser.parse_args(argv)

    try:
        if args.target is not None:
            _check_target(args.target)
        if args.time_to_train or args.status:
            if len(args.logs) != 1:
                parser.error("--time-to-train and --status take exactly one LOG")
            run = parse_log(args.logs[0], args.target)
            if args.status:
                print(run["status"])
                return 0
            if run["time_to_train_s"] is None:
                print(f"mlperf_result: {args.logs[0]}: no time to train ({'; '.join(run['warnings'])})",
                      file=sys.stderr)
                return 1
            print(f"{run['time_to_train_s']:.3f}")
            return 0
        results = []
        for path in args.logs:
            results.extend(parse_runs(path, args.target))
    except ValueError as exc:
        print(f"mlperf_result: {exc}", file=sys.stderr)
        return 2
    summary = score(results)
    print(format_table(results, summary))
    if args.json:
        text = json.dumps({"runs": results, "score": summary}, indent=2)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w", encoding="utf-8") as f:
                f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
