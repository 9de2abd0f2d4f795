"""The CPU image's build time and size: the Dockerfile now (one stage) against an earlier revision's (two
stages, the venv copied from a `build` stage), built side by side with podman, `--no-cache`, on the same
local bases (monaserve.testing.images). Needs root, podman, buildah and debootstrap, and minutes per build.

    sudo .venv/bin/python bench/image_build_bench.py --baseline fa35868 --rounds 1
"""

from __future__ import annotations

import argparse
import subprocess

import torch

from monaserve.testing.images import ROOT, LocalImages, podman

from common import print_table, scratch_folder, write_result

CURRENT, BASELINE = "localhost/monaserve-bench:current", "localhost/monaserve-bench:baseline"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", default="fa35868", help="the git revision whose Dockerfile is the baseline")
    parser.add_argument("--rounds", type=int, default=1, help="builds of each, alternating which goes first")
    parser.add_argument("--keep-bases", action="store_true", help="reuse the local bases if present, and keep them")
    args = parser.parse_args()

    workdir = scratch_folder("monaserve-image-bench-")
    baseline_file = workdir / "Dockerfile.baseline"
    shown = subprocess.run(["git", "show", f"{args.baseline}:Dockerfile"], cwd=ROOT, capture_output=True, text=True, check=True)
    baseline_file.write_text(shown.stdout)
    images = LocalImages(workdir, keep=args.keep_bases)
    images.build_bases()
    rows, builds = [], {CURRENT: [], BASELINE: []}
    try:
        for round_ in range(args.rounds):
            order = [(CURRENT, ROOT / "Dockerfile"), (BASELINE, baseline_file)]
            for tag, dockerfile in order if round_ % 2 == 0 else order[::-1]:
                images.build_monaserve(dockerfile, tag, no_cache=True)
                builds[tag].append({"seconds": images.seconds[tag], "bytes": images.size_bytes(tag)})
                podman("rmi", "--force", tag)
                podman("image", "prune", "--force")
    finally:
        podman("rmi", "--force", "--ignore", CURRENT, BASELINE, check=False)
        images.remove()
    best = {tag: min(b["seconds"] for b in runs) for tag, runs in builds.items()}
    result = {
        "baseline": args.baseline,
        "builds": builds,
        "best_s": best,
        "build_time_ratio": round(best[BASELINE] / best[CURRENT], 2),
        "size_bytes": {tag: runs[0]["bytes"] for tag, runs in builds.items()},
    }
    for tag, runs in builds.items():
        rows.append([tag.rsplit(":", 1)[1], best[tag], round(runs[0]["bytes"] / 1e9, 2)])
    print_table(["Dockerfile", "build s (best)", "image GB"], rows)
    print(f"baseline / current build time: {result['build_time_ratio']}x")
    print(write_result("image-build", torch.device("cpu"), result))


if __name__ == "__main__":
    main()
