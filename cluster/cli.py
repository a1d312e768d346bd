"""The `pdserve` command line.

    pdserve up [--config FILE] [--model DIR] [--prefill N] [--decode N] [--host H] [--port P]
               [--admin-port P] [--served-model-name NAME] [--cluster-name NAME] [--ray-address ADDR]
               [--tool-call-parser hermes] [--reasoning-parser qwen3|deepseek_r1] [--detach]
    pdserve down [--cluster-name NAME]
    pdserve cluster status|workers|scale|drain|remove|quota ...   (client of the management API)
"""

from __future__ import annotations

import argparse
import sys


def _up_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file (see README)")
    p.add_argument("--model", help="local checkpoint directory (or hub id); default: SmolLM2-135M-Instruct")
    p.add_argument("--served-model-name", help="model id in /v1/models (default: directory name)")
    p.add_argument("--prefill", type=int, help="prefill workers")
    p.add_argument("--decode", type=int, help="decode workers")
    p.add_argument("--host", help="bind address of the endpoints (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="OpenAI endpoint port (default 8000)")
    p.add_argument("--admin-port", type=int, help="management API port (default 8001)")
    p.add_argument("--cluster-name", help="cluster name (etcd prefix, Ray namespace)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.add_argument("--ray-address", help="join an existing Ray cluster ('auto' on a ray up / KubeRay head)")
    p.add_argument("--tool-call-parser", choices=["hermes", "gpt_oss"],
                   help="how the model writes tool calls (chat tool_choice 'auto'); see server.tool_call_parser")
    p.add_argument("--reasoning-parser", choices=["qwen3", "deepseek_r1", "gpt_oss"],
                   help="keep a thinking model's reasoning apart from its answer; see server.reasoning_parser")
    p.add_argument("--detach", action="store_true", help="run in the background; stop with `pdserve down`")


def _overrides(a: argparse.Namespace) -> dict:
    pairs = {"model.path": a.model, "model.served_model_name": a.served_model_name, "model.device": a.device,
             "pools.prefill.replicas": a.prefill, "pools.decode.replicas": a.decode, "server.host": a.host,
             "server.port": a.port, "server.admin_port": a.admin_port, "cluster_name": a.cluster_name,
             "server.tool_call_parser": a.tool_call_parser, "server.reasoning_parser": a.reasoning_parser}
    out = {k: v for k, v in pairs.items() if v is not None}
    for role in ("prefill", "decode"):  # a replica count outside the pool's bounds widens them
        n = out.get(f"pools.{role}.replicas")
        if n is not None:
            out.setdefault(f"pools.{role}.min_replicas", min(n, 1))
            out.setdefault(f"pools.{role}.max_replicas", max(n, 4))
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="pdserve", description="Disaggregated LLM serving on Ray")
    sub = parser.add_subparsers(dest="command", required=True)
    _up_args(sub.add_parser("up", help="start a cluster and serve the OpenAI endpoint"))
    down = sub.add_parser("down", help="stop a cluster started with `pdserve up --detach`")
    down.add_argument("--cluster-name", default="default")
    cluster = sub.add_parser("cluster", help="manage a running cluster through its management API")
    from cluster.admin_client import add_cluster_commands

    add_cluster_commands(cluster)
    a = parser.parse_args(argv)
    if a.command == "up":
        from cluster.config import ConfigError, load_config
        from cluster.launcher import up

        try:
            config = load_config(a.config, _overrides(a))
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        child_args = [x for x in argv[1:] if x != "--detach"]
        return up(config, a.ray_address, a.detach, child_args)
    if a.command == "down":
        from cluster.launcher import down as stop

        return stop(a.cluster_name)
    return a.func(a)


if __name__ == "__main__":
    sys.exit(main())
