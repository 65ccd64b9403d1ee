"""Does the noise generator move the learning outcome? The demo (diffq_c.demo:
a small CNN on sklearn digits, one training per size penalty) with several
seeds, under two builds of diffq_c: this working tree and an older commit
(by default the last one with pcg4d and Box-Muller; `26a4466` is the last
with Philox4x32-10 and Box-Muller). The old commit
is exported with `git archive` into a temporary folder and built there, so
the old generator needs no switch in the current code.

    PYTHONPATH=. python benchmarks/noise_fidelity.py                 # 3 seeds
    PYTHONPATH=. python benchmarks/noise_fidelity.py --seeds 0 1 2 --old 26a4466 --new HEAD

Prints, per penalty, the accuracy and the size of each build averaged over
the seeds, and the differences (size relative, accuracy in points). The
issue's bar: sizes within 3% and accuracy within 1 point.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OLD_COMMIT = "210e13f"  # pcg4d with Box-Muller (before it, 26a4466: Philox4x32-10)

RUN_ONE = """
import json, sys, tempfile
import torch
torch.set_num_threads(int(sys.argv[3]))
import diffq_c, diffq_c.demo as demo
with tempfile.TemporaryDirectory() as out:
    result = demo.run(diffq_c, out, seed=int(sys.argv[1]), epochs=int(sys.argv[2]), progress=False)
print("ROWS" + json.dumps(result["rows"]))
"""


def build_commit(commit, where):
    """The package of `commit`, its extension built in place."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", commit], check=True,
                             capture_output=True).stdout
    where.mkdir()
    subprocess.run(["tar", "-x", "-C", str(where)], input=archive, check=True)
    subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=where,
                   check=True, capture_output=True)
    return where


def run_demo(package_root, seed, epochs, threads):
    env = dict(os.environ, PYTHONPATH=str(package_root))
    out = subprocess.run([sys.executable, "-c", RUN_ONE, str(seed), str(epochs), str(threads)],
                         env=env, check=True, capture_output=True, text=True, cwd=package_root).stdout
    line = next(l for l in out.splitlines() if l.startswith("ROWS"))
    return json.loads(line[4:])


def mean(xs):
    return sum(xs) / len(xs)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--old", default=OLD_COMMIT, help="commit with the old generator")
    parser.add_argument("--new", help="commit with the new generator (default: this tree, built)")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="also write every run's rows here")
    args = parser.parse_args()
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        old_root = build_commit(args.old, Path(tmp) / "old")
        new_root = build_commit(args.new, Path(tmp) / "new") if args.new else REPO
        for seed in args.seeds:
            for label, root in (("old", old_root), ("new", new_root)):
                runs.setdefault(label, []).append(run_demo(root, seed, args.epochs, args.threads))
                print(f"seed {seed} {label} done", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=1))
    penalties = [row["penalty"] for row in runs["new"][0]]
    print(f"demo, {len(args.seeds)} seeds ({' '.join(map(str, args.seeds))}), {args.epochs} epochs; "
          f"old = {args.old}, new = {args.new or 'this tree'}")
    print("| penalty | old acc % | new acc % | diff (points) | old size kB | new size kB | diff |")
    print("|---|---|---|---|---|---|---|")
    worst_acc = worst_size = 0.0
    for k, penalty in enumerate(penalties):
        acc = {label: mean([rows[k]["accuracy"] for rows in runs[label]]) for label in runs}
        size = {label: mean([rows[k]["size_kb"] for rows in runs[label]]) for label in runs}
        d_acc = acc["new"] - acc["old"]
        d_size = size["new"] / size["old"] - 1
        worst_acc, worst_size = max(worst_acc, abs(d_acc)), max(worst_size, abs(d_size))
        print(f"| {penalty:g} | {acc['old']:.2f} | {acc['new']:.2f} | {d_acc:+.2f} | "
              f"{size['old']:.2f} | {size['new']:.2f} | {100 * d_size:+.2f}% |")
    print(f"largest differences: accuracy {worst_acc:.2f} points, size {100 * worst_size:.2f}%")


if __name__ == "__main__":
    main()
