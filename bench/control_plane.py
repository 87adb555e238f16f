"""Control-plane benchmark (issue 9). The last line of output is one JSON object.

Sections:

* `ray` (`bench.ray_engine`): embedded Ray start-up, agent actors started and restarted after
  SIGKILL, and the compile fan-out speed-up over Ray tasks against in process on the same shards
  (checked shard for shard equal).

Run: `.venv/bin/python -m bench.control_plane [--skip-real]`.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from bench.ray_engine import measure_ray


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--agents", type=int, default=4, help="agent actors to start")
    parser.add_argument("--restarts", type=int, default=3, help="SIGKILL/restart rounds")
    parser.add_argument("--model", default="qwen2.5-0.5b", help="seeded model for real shards")
    parser.add_argument("--skip-real", action="store_true", help="only the virtual 405B compile")
    args = parser.parse_args()
    result: dict[str, Any] = {"bench": "control_plane"}
    result["ray"] = measure_ray(args.agents, args.restarts, args.model, not args.skip_real)
    sys.stdout.flush()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
