"""The `eep` command line: argparse at the edge, mapped onto the config dataclasses.

This is the only module that reads argv or the environment (`EEP_CACHE_DIR`, `XDG_CACHE_HOME`
for where the embedded default model lives, `XDG_RUNTIME_DIR` for `eep serve`'s socket,
`EEP_API_KEY` and `EEP_ADMIN_API_KEY` for its HTTP keys).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import sys
from typing import Any
from pathlib import Path

from eep.errors import ConfigError, EepError

logger = logging.getLogger("eep")


def default_cache_dir() -> Path:
    if os.environ.get("EEP_CACHE_DIR"):
        return Path(os.environ["EEP_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "eep"


def _model_path(args: argparse.Namespace) -> str:
    """`--model-path` if given, else the embedded default model (created on first use)."""
    if args.model_path:
        return args.model_path
    from eep.model.default_model import ensure_default_model

    path = ensure_default_model(Path(args.cache_dir), args.arch)
    logger.info("using the embedded default model at %s", path)
    return str(path)


def _default(cls: type, name: str) -> object:
    """The default of dataclass field `name`, so CLI defaults cannot drift from the config's."""
    return next(f.default for f in dataclasses.fields(cls) if f.name == name)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    from eep.config import EngineConfig
    from eep.model.default_model import ARCHES, DEFAULT_ARCH

    p.add_argument("--model-path", help="Hugging Face checkpoint directory (default: the embedded default model)")
    p.add_argument("--arch", choices=ARCHES, default=DEFAULT_ARCH, help="architecture of the default model")
    p.add_argument("--dtype", default=_default(EngineConfig, "dtype"), choices=["auto", "float32", "bfloat16"])


def _cmd_generate(args: argparse.Namespace) -> int:
    from eep.engine.sampling import SamplingParams
    from eep.llm import LLM

    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed
    )
    with LLM(
        _model_path(args), dtype=args.dtype, max_model_len=args.max_model_len, ep_size=args.ep_size,
        ep_num_redundant_experts=args.ep_num_redundant_experts, ep_backend=args.ep_backend,
    ) as llm:
        for out in llm.generate(args.prompt, params):  # all prompts batched together
            print(out.text if out.text is not None else " ".join(map(str, out.output_ids)), flush=True)
    return 0


def default_socket() -> str:
    from eep.serving.server import default_socket_path

    return default_socket_path(os.environ.get("XDG_RUNTIME_DIR"))


def _serve_config(args: argparse.Namespace) -> Any:
    """`eep serve`'s ServeConfig from its flags (the head's; a standby is started with the same)."""
    from eep.config import EngineConfig
    from eep.control.config import EPConfig
    from eep.serving.server import ServeConfig

    return ServeConfig(
        EngineConfig(
            _model_path(args), dtype=args.dtype, max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
            max_prefill_tokens=args.max_prefill_tokens,
        ),
        socket_path=args.socket,
        ep=EPConfig(
            ep_size=args.ep_size, ep_max_size=args.ep_max_size, num_redundant_experts=args.ep_num_redundant_experts,
            backend=args.ep_backend, fault_policy=args.fault_policy, failure_timeout_s=args.failure_timeout, rejoin=args.rejoin,
            on_uncoverable=args.on_uncoverable, num_spare_slots=args.ep_spare_slots,
            expert_backup=not args.no_expert_backup, cpu_affinity=not args.no_cpu_affinity,
            fork_server=not args.no_fork_server, nnodes=args.nnodes, dist_init_addr=args.dist_init_addr,
            etcd_endpoints=tuple(e for e in (args.etcd_endpoints or "").split(",") if e), instance=args.instance,
            head_lease_ttl_s=args.head_lease_ttl, cluster_secret_file=args.cluster_secret_file, curve_data_plane=not args.insecure_data_plane,
            allow_unauthenticated_gloo=args.allow_unauthenticated_gloo,
            enable_eplb=args.enable_eplb, eplb_window_steps=args.eplb_window_steps,
            eplb_rebalance_num_iterations=args.eplb_rebalance_num_iterations,
            eplb_imbalance_threshold=args.eplb_imbalance_threshold,
        ),
        request_timeout_s=args.request_timeout,
        http=args.http, api_key=args.api_key or os.environ.get("EEP_API_KEY"),
        admin_api_key=args.admin_api_key or os.environ.get("EEP_ADMIN_API_KEY"),
        served_model_name=args.served_model_name,
    )


def _cmd_standby(args: argparse.Namespace) -> int:
    """`eep serve --standby`: follow the head's journal, answer as a standby (eep.serving.standby)."""
    import signal
    import threading

    from eep.control.config import SECRET_HOW
    from eep.serving.standby import StandbyConfig, run_standby

    if not args.dist_init_addr or not args.cluster_secret_file or not args.http:
        raise ConfigError(f"--standby needs --dist-init-addr HOST:PORT (the head's), --http HOST:PORT and "
                          f"--cluster-secret-file PATH ({SECRET_HOW})")
    config = StandbyConfig(args.node_rank, args.dist_init_addr, args.cluster_secret_file, args.http,
                           api_key=args.api_key or os.environ.get("EEP_API_KEY"),
                           admin_api_key=args.admin_api_key or os.environ.get("EEP_ADMIN_API_KEY"),
                           serve=_serve_config(args))
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())

    def ready(url: str) -> None:
        print(f"eep serve: standby on {url} (head at {config.head})", flush=True)

    return run_standby(config, stop, on_ready=ready)


def _cmd_serve(args: argparse.Namespace) -> int:
    if args.standby:
        return _cmd_standby(args)
    if args.node_rank > 0:  # a host agent: this host's ranks, for the controller on node 0
        from eep.control.config import SECRET_HOW
        from eep.runtime.agent import main as agent_main
        from eep.security.secret import ClusterSecret

        if not args.dist_init_addr:
            raise ConfigError("--node-rank > 0 needs --dist-init-addr HOST:PORT (node 0's)")
        if not args.cluster_secret_file:
            raise ConfigError(f"a host agent (--node-rank > 0) needs --cluster-secret-file PATH: {SECRET_HOW}")
        return agent_main(args.node_rank, args.dist_init_addr, ClusterSecret.load(args.cluster_secret_file))
    from eep.serving.server import serve

    config = _serve_config(args)

    def ready(status: dict[str, object]) -> None:
        # The command's contract with whoever started it (scripts, tests): exactly this one
        # line on stdout once requests are answered; everything else goes to the log (stderr).
        http = f" http {status['http']}" if status.get("http") else ""
        print(f"eep serve: ready on unix:{status['socket']} ({status['ep_size']} ranks, {status['backend']}){http}",
              flush=True)

    return serve(config, on_ready=ready)


def _cmd_secret_init(args: argparse.Namespace) -> int:
    from eep.security.secret import init_secret_file

    path = init_secret_file(args.path)
    print(f"{path}: a new cluster secret (mode 0600); copy it to every host and pass "
          f"--cluster-secret-file {path} to every `eep serve` of the instance")
    return 0


def _cmd_secret_etcd_grant(args: argparse.Namespace) -> int:
    from eep.membership.etcd_auth import enable_auth, grant_instance
    from eep.security.secret import ClusterSecret

    secret = ClusterSecret.load(args.cluster_secret_file)
    try:
        root = Path(args.root_password_file).read_text().strip()
    except OSError as e:
        raise ConfigError(f"cannot read {args.root_password_file}: {e.strerror}") from None
    endpoint = args.etcd_endpoints.split(",")[0]
    enable_auth(endpoint, root)
    user = grant_instance(endpoint, root, args.instance, secret)
    print(f"etcd user {user}: read and write on /eep/{args.instance}/ only; authentication is on")
    return 0


def _cmd_model_init(args: argparse.Namespace) -> int:
    from eep.model.default_model import default_model_dir, init_model

    out = Path(args.out) if args.out else default_model_dir(Path(args.cache_dir), args.arch, args.router_skew)
    path = init_model(out, args.arch, force=args.force, router_skew=args.router_skew)
    print(path)
    return 0


def _cmd_bench_engine(args: argparse.Namespace) -> int:
    from eep.bench.engine import run_engine_bench

    result = run_engine_bench(
        _model_path(args),
        batch_size=args.batch_size,
        output_len=args.output_len,
        prompt_len=args.prompt_len,
        dtype=args.dtype,
        repeats=args.repeats,
    )
    _write_json(result, args.json)
    return 0


def _cmd_bench_steady(args: argparse.Namespace) -> int:
    from eep.bench.steady import run_steady_bench
    from eep.control.config import BACKENDS

    result = run_steady_bench(
        _model_path(args),
        ep_size=args.ep_size,
        backends=BACKENDS if args.ep_backend == "both" else (args.ep_backend,),
        num_requests=args.num_requests,
        prompt_len=args.prompt_len,
        output_len=args.output_len,
        num_redundant_experts=args.ep_num_redundant_experts,
        dtype=args.dtype,
        seed=args.seed,
    )
    _write_json(result, args.json)
    return 0


def _cmd_bench_recovery(args: argparse.Namespace) -> int:
    from eep.bench.recovery import run_recovery_bench

    result = run_recovery_bench(
        _model_path(args), ep_size=args.ep_size, victim=args.victim, concurrency=args.concurrency,
        prompt_len=args.prompt_len, output_len=args.output_len, fault_at_s=args.fault_at,
        rejoin_after_s=args.rejoin_after, num_redundant_experts=args.ep_num_redundant_experts,
        failure_timeout_s=args.failure_timeout, dtype=args.dtype, seed=args.seed, fork_server=not args.no_fork_server,
    )
    summary = {k: result[k] for k in ("recovery_pause_s", "reintegration_pause_s", "time_to_95_s", "reached_95",
                                       "rejoin_s", "requests_lost", "outputs_differing")}
    if args.json:  # the whole record (series, events); the summary goes to stdout
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


def _cmd_bench_plan(args: argparse.Namespace) -> int:
    from eep.bench.plan import run_plan_bench, summary_table

    result = run_plan_bench(tuple(int(n) for n in args.ep_sizes.split(",")), repeats=args.repeats)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    print(summary_table(result))
    return 0


def _cmd_bench_eplb(args: argparse.Namespace) -> int:
    from eep.bench.eplb import plot, run_eplb_bench, summary_table
    from eep.model.default_model import ensure_default_model

    model = args.model_path or str(ensure_default_model(Path(args.cache_dir), "deepseek_v3", args.router_skew))
    result = run_eplb_bench(
        model, ep_size=args.ep_size, redundant=args.ep_num_redundant_experts, spare=args.ep_spare_slots,
        concurrency=args.concurrency, iterations=args.eplb_rebalance_num_iterations, window=args.eplb_window_steps,
        steady_rounds=args.steady_rounds, steady_slice_s=args.steady_slice, calibrate=args.calibrate,
        fault_at_s=args.fault_at, rejoin_after_s=args.rejoin_after, tail_s=args.tail, seed=args.seed,
    )
    result["config"]["router_skew"] = None if args.model_path else args.router_skew
    return _bench_out(args, result, summary_table, plot)


def _cmd_bench_scale(args: argparse.Namespace) -> int:
    from eep.bench.scale import run_scale_bench, summary_table
    from eep.model.default_model import ensure_default_model

    model = args.model_path or str(ensure_default_model(Path(args.cache_dir), "deepseek_v3", args.router_skew))
    result = run_scale_bench(
        model, ep_size=args.ep_size, max_size=args.ep_max_size, sizes=tuple(int(n) for n in args.sizes.split(",")),
        redundant=args.ep_num_redundant_experts, concurrency=args.concurrency, steady_s=args.steady,
        settle_s=args.settle, seed=args.seed,
    )
    return _bench_out(args, result, summary_table)


def _cmd_bench_head(args: argparse.Namespace) -> int:
    from eep.bench.head import plot, run_head_bench, summary_table
    from eep.model.default_model import ensure_default_model

    model = args.model_path or str(ensure_default_model(Path(args.cache_dir), "qwen3_moe"))
    result = run_head_bench(model, schedules=tuple(args.schedules.split(",")), concurrency=args.concurrency,
                            max_tokens=args.max_tokens, head_lease_ttl_s=args.head_lease_ttl)
    return _bench_out(args, result, summary_table, plot)


def _bench_out(args: argparse.Namespace, result: dict[str, Any], table: Any, plot: Any = None) -> int:
    """A bench's record to `--json`, its picture to `--plot` (where it draws one), its table to stdout."""
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    if plot is not None and args.plot:
        plot(result, args.plot)
    print(table(result))
    return 0


def _cmd_sim(args: argparse.Namespace) -> int:
    from eep.sim import report
    from eep.sim.cluster import DEFAULT_CLUSTER, DEFAULT_MODEL

    model, cluster = args.model_config or DEFAULT_MODEL, args.cluster or DEFAULT_CLUSTER
    if args.sim_command == "paper":
        result = report.run_paper(model, cluster)
        table, plot = report.paper_table(result), report.plot_paper
    else:
        result = report.run_scale(model, cluster, tuple(int(n) for n in args.ep_sizes.split(",")))
        table, plot = report.scale_table(result), report.plot_scale
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    plot(result, args.plot)
    print(table)
    print(f"record: {args.json}\npicture: {args.plot}")
    return 0


def _cmd_bench_failure(args: argparse.Namespace) -> int:
    from eep.bench.failure import (
        plot,
        run_failure_bench,
        run_steady_calibration,
        summary_table,
    )

    args.json = args.json or ("out/calibration.json" if args.calibrate else "out/failure.json")
    if args.calibrate:
        result = run_steady_calibration(
            _model_path(args), ep_size=args.ep_size, concurrency=args.concurrency, prompt_len=args.prompt_len,
            output_len=args.output_len, rounds=args.steady_rounds, slice_s=args.steady_slice, dtype=args.dtype,
            seed=args.seed, system=args.calibrate,
        )
    else:
        result = run_failure_bench(
            _model_path(args), ep_size=args.ep_size, victim=args.victim, concurrency=args.concurrency,
            prompt_len=args.prompt_len, output_len=args.output_len, fault_at_s=args.fault_at,
            rejoin_after_s=args.rejoin_after, tail_s=args.tail, failure_timeout_s=args.failure_timeout,
            systems=tuple(args.systems.split(",")), steady_rounds=args.steady_rounds,
            steady_slice_s=args.steady_slice, dtype=args.dtype, seed=args.seed,
            eep_args=("--enable-eplb",) if args.enable_eplb else (),
        )
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    if args.calibrate:
        s, rounds = result["summary"], result["steady_state"]["round_ratios"]
        if rounds:
            print(f"A/A steady-state ratio of two {args.calibrate} servers: {s['aa_ratio']:.3f} over "
                  f"{len(rounds)} rounds (single rounds {s['aa_round_min']:.3f}-{s['aa_round_max']:.3f})")
        if s["steady_state_cpu_ratio"] is not None:
            stdev = s["steady_state_cpu_ratio_stdev"]
            print(f"A/A steady-state CPU ratio (CPU seconds per token, b / a): {s['steady_state_cpu_ratio']:.4f} "
                  f"(single rounds {s['steady_state_cpu_ratio_min']:.4f}-{s['steady_state_cpu_ratio_max']:.4f}"
                  f"{f', stdev {stdev:.4f}' if stdev is not None else ''}; {s['steady_state_cpu_source']})")
        else:
            print("A/A steady-state ratio: no round had work in common (slices too short?)")
        if s["steady_state_bookkeeping_ratio"] is not None:
            print(f"A/A steady-state bookkeeping ratio (share of CPU time serving tokens, a / b): "
                  f"{s['steady_state_bookkeeping_ratio']:.5f} (single rounds {s['steady_state_bookkeeping_ratio_min']:.5f}"
                  f"-{s['steady_state_bookkeeping_ratio_max']:.5f})")
        print(f"record: {args.json}")
        return 0
    plot(result, args.plot)
    print(summary_table(result))
    print(f"\nsummary: {json.dumps(result['summary'])}")
    print(f"record: {args.json}\npicture: {args.plot}")
    return 0


def _cmd_bench_chaos(args: argparse.Namespace) -> int:
    from eep.bench.chaos import run_chaos_bench, summary_line

    json_path = Path(args.json)
    result = run_chaos_bench(
        _model_path(args), ep_size=args.ep_size, concurrency=args.concurrency, seconds=args.seconds, seed=args.seed,
        failure_timeout_s=args.failure_timeout, prompt_len=args.prompt_len, output_len=args.output_len,
        dtype=args.dtype, keep_log=json_path.with_suffix(".serve.log"),
    )
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"summary: {summary_line(result)}")
    print(f"record: {json_path}")
    if result.get("server_log"):
        print(f"the run shows a failure; the server's log: {result['server_log']}")
    return 0  # the figures decide, not the exit code


def _cmd_bench_hosts(args: argparse.Namespace) -> int:
    from eep.bench.hosts import add_targets, plot, run_hosts_bench, summary_table

    result = add_targets(run_hosts_bench(
        _model_path(args), hosts=args.hosts, ranks_per_host=args.ranks_per_host, concurrency=args.concurrency,
        prompt_len=args.prompt_len, output_len=args.output_len, failure_timeout_s=args.failure_timeout,
        steady_rounds=args.steady_rounds, steady_slice_s=args.steady_slice, dtype=args.dtype, seed=args.seed,
    ))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    plot(result, args.plot)
    print(summary_table(result))
    print(f"\nsummary: {json.dumps(result['summary'])}")
    print(f"record: {args.json}\npicture: {args.plot}")
    return 0


def _cmd_bench_fuzz(args: argparse.Namespace) -> int:
    from eep.bench.fuzz import run_fuzz_bench, summary_table

    result = run_fuzz_bench(
        _model_path(args), ranks_per_host=args.ranks_per_host, concurrency=args.concurrency,
        prompt_len=args.prompt_len, output_len=args.output_len, connections=args.connections, seed=args.seed,
        dtype=args.dtype,
    )
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    print(summary_table(result))
    print(f"record: {args.json}")
    return 0


def _write_json(result: dict[str, object], path: str | None) -> None:
    text = json.dumps(result, indent=2)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text + "\n")
    print(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eep", description="Elastic expert-parallel MoE inference.")
    parser.add_argument("--cache-dir", default=str(default_cache_dir()), help="where the default model is kept")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = sub.add_parser("generate", help="generate a continuation of one or more prompts")
    _add_model_args(gen)
    gen.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for several)")
    gen.add_argument("--max-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0, help="0 = off")
    gen.add_argument("--seed", type=int, default=None)
    from eep.config import EngineConfig

    gen.add_argument("--max-model-len", type=int, default=_default(EngineConfig, "max_model_len"))
    gen.add_argument("--ep-size", type=int, default=1, help="expert-parallel rank processes (1 = in this process)")
    gen.add_argument("--ep-num-redundant-experts", type=int, default=0, help="extra expert slots for replicas")
    gen.add_argument("--ep-backend", choices=["shm", "gloo"], default="shm", help="data plane between ranks")
    gen.set_defaults(func=_cmd_generate)

    from eep.control.config import EPConfig
    from eep.serving.server import ServeConfig

    srv = sub.add_parser("serve", help="run an instance that answers requests on a Unix socket (eep.Client)")
    _add_model_args(srv)
    srv.add_argument("--ep-size", type=int, default=_default(EPConfig, "ep_size"), help="expert-parallel rank processes")
    srv.add_argument("--ep-max-size", type=int, default=None,
                     help="the most ranks POST /admin/scale may grow the instance to: its data plane, tables and "
                          "rank numbers are sized for this many at start (default: --ep-size)")
    srv.add_argument("--ep-num-redundant-experts", type=int, default=_default(EPConfig, "num_redundant_experts"))
    srv.add_argument("--ep-backend", choices=["shm", "gloo"], default=_default(EPConfig, "backend"))
    srv.add_argument("--fault-policy", choices=["repair", "none", "restart"], default=None,
                     help="repair: survive rank failures (shm default); none: fixed membership (gloo default); "
                          "restart: the full-restart baseline (relaunch every rank on any failure)")
    srv.add_argument("--failure-timeout", type=float, default=_default(EPConfig, "failure_timeout_s"),
                     help="seconds of heartbeat silence that confirm a failed rank")
    srv.add_argument("--rejoin", choices=["manual", "auto"], default=_default(EPConfig, "rejoin"),
                     help="auto: restart a failed rank at once; manual: only when asked")
    srv.add_argument("--on-uncoverable", choices=["pause", "degrade"], default=_default(EPConfig, "on_uncoverable"),
                     help="when survivors cannot hold every expert: pause admission, or serve degraded")
    srv.add_argument("--ep-spare-slots", type=int, default=None,
                     help="empty expert slots per rank kept for repairs (default: enough to re-home one rank's experts; "
                          "across hosts, one host's)")
    srv.add_argument("--enable-eplb", action="store_true",
                     help="online expert load balancing: move experts to follow the observed load while serving "
                          "(peer-to-peer copies into free slots, one table switch at a step boundary)")
    srv.add_argument("--eplb-window-steps", type=int, default=_default(EPConfig, "eplb_window_steps"),
                     help="steps of expert load the balancer looks at (the load is counted, and shown in /metrics, "
                          "also without --enable-eplb)")
    srv.add_argument("--eplb-rebalance-num-iterations", type=int,
                     default=_default(EPConfig, "eplb_rebalance_num_iterations"),
                     help="rebalance every this many steps (sooner past --eplb-imbalance-threshold)")
    srv.add_argument("--eplb-imbalance-threshold", type=float, default=_default(EPConfig, "eplb_imbalance_threshold"),
                     help="rebalance as soon as a layer's most loaded rank carries this much more than the mean")
    srv.add_argument("--http", metavar="HOST:PORT", help="also serve the OpenAI-compatible HTTP API (e.g. 127.0.0.1:8000)")
    srv.add_argument("--api-key",
                     help="every HTTP endpoint but /admin wants 'Authorization: Bearer KEY' (or set EEP_API_KEY)")
    srv.add_argument("--admin-api-key", help="the /admin endpoints (rejoin, drain) want 'Authorization: Bearer KEY'; "
                                             "without one they answer 403 (or set EEP_ADMIN_API_KEY)")
    srv.add_argument("--served-model-name", help="the model id of the HTTP API (default: the model folder's name)")
    srv.add_argument("--no-expert-backup", action="store_true", help="no host-memory expert copy (repairs read the disk)")
    srv.add_argument("--no-cpu-affinity", action="store_true",
                     help="do not pin ranks to cores (default: active ranks round-robin over this process's cores)")
    srv.add_argument("--no-fork-server", action="store_true",
                     help="start every rank as a fresh interpreter (default: ranks are forked from one interpreter "
                          "that imported torch once, on this host)")
    srv.add_argument("--max-model-len", type=int, default=_default(EngineConfig, "max_model_len"))
    srv.add_argument("--max-num-seqs", type=int, default=_default(EngineConfig, "max_num_seqs"))
    srv.add_argument("--max-prefill-tokens", type=int, default=_default(EngineConfig, "max_prefill_tokens"),
                     help="prefill tokens per rank in a step that also decodes (chunked prefill)")
    srv.add_argument("--socket", default=default_socket(), help="Unix socket path (default: %(default)s)")
    srv.add_argument("--nnodes", type=int, default=1, help="hosts of the instance; --ep-size counts the ranks of all")
    srv.add_argument("--node-rank", type=int, default=0,
                     help="0: the head (frontend, controller and its host's ranks); i > 0: a host agent and its ranks")
    srv.add_argument("--standby", action="store_true",
                     help="a standby head on node --node-rank: follows the head's journal of requests (needs "
                          "--dist-init-addr, --http, --cluster-secret-file); /health answers 503 standby")
    srv.add_argument("--dist-init-addr", metavar="HOST:PORT",
                     help="node 0's address for the agents (data-plane ports follow it: PORT+1+rank)")
    srv.add_argument("--etcd-endpoints", metavar="URL[,URL...]",
                     help="etcd members that hold the committed membership (default: in memory)")
    srv.add_argument("--instance", default="default", help="the instance's name in etcd")
    srv.add_argument("--head-lease-ttl", type=float, default=_default(EPConfig, "head_lease_ttl_s"), metavar="S",
                     help="with etcd: the head holds the instance's leader key under a lease of this many seconds "
                          "(only the holder commits views)")
    srv.add_argument("--cluster-secret-file", metavar="PATH",
                     help="the cluster credential (`eep secret init PATH`, mode 0600, the same file on every host): "
                          "required across hosts; every connection between hosts proves it holds it")
    srv.add_argument("--insecure-data-plane", action="store_true",
                     help="across hosts, the ranks' ZeroMQ data addresses without CURVE: frames from anyone who "
                          "reaches them, unencrypted (only on a network you trust; measured cost: docs/benchmarks.md)")
    srv.add_argument("--allow-unauthenticated-gloo", action="store_true",
                     help="allow --ep-backend gloo across hosts (torch's TCPStore and gloo's connections have no "
                          "authentication: a benchmark baseline for a trusted network)")
    srv.add_argument(
        "--request-timeout", type=float, default=_default(ServeConfig, "request_timeout_s"),
        help="seconds before a generate request is aborted",
    )
    srv.set_defaults(func=_cmd_serve)

    sec = sub.add_parser("secret", help="the cluster credential of a multi-host instance")
    sec_sub = sec.add_subparsers(dest="secret_command", required=True, metavar="ACTION")
    sinit = sec_sub.add_parser("init", help="write a fresh cluster secret (32 random bytes, mode 0600)")
    sinit.add_argument("path", help="the file to create (never overwritten)")
    sinit.set_defaults(func=_cmd_secret_init)
    grant = sec_sub.add_parser("etcd-grant", help="make an instance's etcd user (read/write on its keys only; "
                                                  "password derived from the cluster secret) and turn auth on")
    grant.add_argument("--etcd-endpoints", required=True, metavar="URL[,URL...]", help="etcd (one member suffices)")
    grant.add_argument("--instance", default="default", help="the instance's name in etcd")
    grant.add_argument("--cluster-secret-file", required=True, metavar="PATH")
    grant.add_argument("--root-password-file", required=True, metavar="PATH",
                       help="etcd's root password (made with it if etcd has no root user yet)")
    grant.set_defaults(func=_cmd_secret_etcd_grant)

    model = sub.add_parser("model", help="manage the embedded default model")
    model_sub = model.add_subparsers(dest="model_command", required=True, metavar="ACTION")
    init = model_sub.add_parser("init", help="write the small deterministic default checkpoint")
    from eep.model.default_model import ARCHES, DEFAULT_ARCH

    init.add_argument("--arch", choices=ARCHES, default=DEFAULT_ARCH)
    init.add_argument("--out", help="target directory (default: CACHE_DIR/models/NAME)")
    init.add_argument("--force", action="store_true", help="rebuild even if it exists")
    init.add_argument("--router-skew", type=float, default=0.0, metavar="ALPHA",
                      help="routers that prefer some experts (Zipf-like selection bias, other experts per layer; "
                           "deepseek_v3 only); 0: the default model")
    init.set_defaults(func=_cmd_model_init)

    bench = sub.add_parser("bench", help="benchmarks that write JSON")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True, metavar="BENCH")
    eng = bench_sub.add_parser("engine", help="decode tokens/s of eep vs transformers on one checkpoint")
    _add_model_args(eng)
    eng.add_argument("--batch-size", type=int, default=16)
    eng.add_argument("--output-len", type=int, default=64)
    eng.add_argument("--prompt-len", type=int, default=32)
    eng.add_argument("--repeats", type=int, default=3)
    eng.add_argument("--json", help="write the result here")
    eng.set_defaults(func=_cmd_bench_engine)
    steady = bench_sub.add_parser("steady", help="steady-state decode of one request set over the shm and gloo data planes")
    _add_model_args(steady)
    steady.add_argument("--ep-size", type=int, default=4)
    steady.add_argument("--ep-backend", choices=["shm", "gloo", "both"], default="both")
    steady.add_argument("--ep-num-redundant-experts", type=int, default=0)
    steady.add_argument("--num-requests", type=int, default=64)
    steady.add_argument("--prompt-len", type=int, default=128)
    steady.add_argument("--output-len", type=int, default=128)
    steady.add_argument("--seed", type=int, default=0)
    steady.add_argument("--json", help="write the result here")
    steady.set_defaults(func=_cmd_bench_steady)
    rec = bench_sub.add_parser("recovery", help="recovery and reintegration pauses after one SIGKILLed rank, under load")
    _add_model_args(rec)
    rec.add_argument("--ep-size", type=int, default=4)
    rec.add_argument("--victim", type=int, default=1, help="the rank to kill")
    rec.add_argument("--concurrency", type=int, default=32, help="requests kept running (closed loop)")
    rec.add_argument("--prompt-len", type=int, default=32)
    rec.add_argument("--output-len", type=int, default=48)
    rec.add_argument("--fault-at", type=float, default=4.0, help="seconds of steady serving before the kill")
    rec.add_argument("--rejoin-after", type=float, default=3.0, help="seconds from the kill to the rejoin request")
    rec.add_argument("--ep-num-redundant-experts", type=int, default=0)
    rec.add_argument("--failure-timeout", type=float, default=1.0)
    rec.add_argument("--no-fork-server", action="store_true", help="every rank, the rejoining one too, is a fresh interpreter")
    rec.add_argument("--seed", type=int, default=0)
    rec.add_argument("--json", help="write the result here")
    rec.set_defaults(func=_cmd_bench_recovery)
    fail = bench_sub.add_parser(
        "failure", help="the failure experiment over HTTP: eep vs fixed membership vs full restart (JSON + PNG)"
    )
    _add_model_args(fail)
    fail.add_argument("--ep-size", type=int, default=4)
    fail.add_argument("--victim", type=int, default=1, help="the rank to kill")
    fail.add_argument("--concurrency", type=int, default=32, help="clients in the closed loop")
    fail.add_argument("--prompt-len", type=int, default=32)
    fail.add_argument("--output-len", type=int, default=48, help="mean output length (uniform in 0.5x..1.5x)")
    fail.add_argument("--fault-at", type=float, default=6.0, help="seconds of load before the kill")
    fail.add_argument("--rejoin-after", type=float, default=3.0, help="seconds from the kill to the rejoin request")
    fail.add_argument("--tail", type=float, default=4.0, help="seconds of load after the rejoin request")
    fail.add_argument("--failure-timeout", type=float, default=1.0)
    fail.add_argument("--systems", default="eep,restart,fixed",
                      help="comma list of eep, restart (shm), fixed and gloo-restart (the restart on gloo)")
    fail.add_argument("--steady-rounds", type=int, default=5,
                      help="rounds of alternating eep / fixed slices for the steady-state ratios, wall-clock "
                           "and CPU (0: none)")
    fail.add_argument("--steady-slice", type=float, default=2.5, help="seconds per slice")
    fail.add_argument("--seed", type=int, default=0)
    fail.add_argument("--enable-eplb", action="store_true", help="run the eep system with --enable-eplb")
    fail.add_argument("--calibrate", nargs="?", const="fixed", default=None, choices=("fixed", "eep"),
                      help="instead of the experiment: the steady-state comparison between two identical "
                           "servers (A/A, --steady-rounds rounds; fixed-membership ones unless 'eep' is given), "
                           "how far this machine resolves steady_state_ratio, steady_state_cpu_ratio and "
                           "steady_state_bookkeeping_ratio")
    fail.add_argument("--json", default=None,
                      help="the whole record (default: out/failure.json, with --calibrate out/calibration.json)")
    fail.add_argument("--plot", default="out/failure.png", help="the picture (default: %(default)s)")
    fail.set_defaults(func=_cmd_bench_failure)
    chaos = bench_sub.add_parser(
        "chaos", help="chaos soak over HTTP: seeded random kills, stops, drains and rejoins under load (JSON)"
    )
    _add_model_args(chaos)
    chaos.add_argument("--ep-size", type=int, default=4)
    chaos.add_argument("--concurrency", type=int, default=16, help="clients in the closed loop (1 in 4 not streaming)")
    chaos.add_argument("--seconds", type=float, default=600.0, help="seconds of faults")
    chaos.add_argument("--seed", type=int, default=7, help="seeds the fault schedule and the request trace")
    chaos.add_argument("--failure-timeout", type=float, default=1.0)
    chaos.add_argument("--prompt-len", type=int, default=32)
    chaos.add_argument("--output-len", type=int, default=32, help="mean output length (uniform in 0.5x..1.5x)")
    chaos.add_argument("--json", default="out/chaos.json",
                       help="the whole record (default: %(default)s); the server's log of a failed run goes next "
                            "to it (.serve.log)")
    chaos.set_defaults(func=_cmd_bench_chaos)
    hb = bench_sub.add_parser(
        "hosts", help="the failure experiment across hosts (network namespaces, root): a host lost, returned, "
                      "partitioned; steady speed against one host and against gloo (JSON + picture)"
    )
    _add_model_args(hb)
    hb.set_defaults(dtype="float32")  # bf16 matmul is ~80x slower than fp32 on CPUs without AVX-512 BF16
    hb.add_argument("--hosts", type=int, default=2)
    hb.add_argument("--ranks-per-host", type=int, default=2)
    hb.add_argument("--concurrency", type=int, default=16, help="clients in the closed loop")
    hb.add_argument("--prompt-len", type=int, default=32)
    hb.add_argument("--output-len", type=int, default=32, help="mean output length (uniform in 0.5x..1.5x)")
    hb.add_argument("--failure-timeout", type=float, default=1.0)
    hb.add_argument("--steady-rounds", type=int, default=8,
                    help="alternating slices against each baseline (one round's ratio spreads +-20 %% here)")
    hb.add_argument("--steady-slice", type=float, default=2.5, help="seconds per slice")
    hb.add_argument("--seed", type=int, default=0)
    hb.add_argument("--json", default="out/hosts.json", help="the whole record (default: %(default)s)")
    hb.add_argument("--plot", default="out/hosts.png", help="the picture (default: %(default)s)")
    hb.set_defaults(func=_cmd_bench_hosts)
    fz = bench_sub.add_parser(
        "fuzz", help="every door of a live two-host instance attacked while it serves (network namespaces, "
                     "root): PoC, strangers, wrong secrets, malformed traffic, replays, a connection flood (JSON)")
    _add_model_args(fz)
    fz.set_defaults(dtype="float32")
    fz.add_argument("--ranks-per-host", type=int, default=2)
    fz.add_argument("--concurrency", type=int, default=16, help="streaming clients while the attacks run")
    fz.add_argument("--connections", type=int, default=2000, help="connections opened and dropped, over all ports")
    fz.add_argument("--prompt-len", type=int, default=16)
    fz.add_argument("--output-len", type=int, default=24)
    fz.add_argument("--seed", type=int, default=0, help="the order of the attacks, their random bytes, the trace")
    fz.add_argument("--json", default="out/fuzz.json", help="the whole record (default: %(default)s)")
    fz.set_defaults(func=_cmd_bench_fuzz)
    pl = bench_sub.add_parser("plan", help="the repair planner timed on DeepSeek-V3's MoE shape at EP 32-256 (JSON)")
    pl.add_argument("--ep-sizes", default="32,64,128,256", help="comma-separated EP sizes (multiples of 8)")
    pl.add_argument("--repeats", type=int, default=5, help="timed plans per case; the slowest is reported")
    pl.add_argument("--json", default="out/plan.json", help="the whole record (default: %(default)s)")
    pl.set_defaults(func=_cmd_bench_plan)

    eb = bench_sub.add_parser("eplb", help="online expert load balancing on a skewed model under load, through a "
                                           "rank's failure and rejoin (JSON, PNG)")
    eb.add_argument("--model-path", help="a checkpoint (default: the skewed default DeepSeek-V3, built on first use)")
    eb.add_argument("--router-skew", type=float, default=1.0, help="the default model's router skew (ALPHA)")
    eb.add_argument("--ep-size", type=int, default=4)
    eb.add_argument("--ep-num-redundant-experts", type=int, default=8, help="the replica budget per layer")
    eb.add_argument("--ep-spare-slots", type=int, default=8,
                    help="empty slots per rank (eep's default for 4 ranks and 8 redundant experts is 6: just enough "
                         "to re-home one rank's; 2 more give the survivors room to rebalance)")
    eb.add_argument("--concurrency", type=int, default=16)
    eb.add_argument("--eplb-rebalance-num-iterations", type=int, default=100)
    eb.add_argument("--eplb-window-steps", type=int, default=300)
    eb.add_argument("--steady-rounds", type=int, default=6, help="rounds of alternating slices (eplb, static)")
    eb.add_argument("--steady-slice", type=float, default=5.0, help="seconds per slice")
    eb.add_argument("--calibrate", action="store_true", help="also compare two static servers (the A/A spread)")
    eb.add_argument("--fault-at", type=float, default=8.0)
    eb.add_argument("--rejoin-after", type=float, default=20.0)
    eb.add_argument("--tail", type=float, default=20.0)
    eb.add_argument("--seed", type=int, default=0)
    eb.add_argument("--json", default="out/eplb.json", help="the whole record (default: %(default)s)")
    eb.add_argument("--plot", default="out/eplb.png", help="the picture (default: %(default)s)")
    eb.set_defaults(func=_cmd_bench_eplb)

    sc = bench_sub.add_parser("scale", help="scale up and down under HTTP load (POST /admin/scale): time, pause, "
                                            "lost and differing requests (JSON)")
    sc.add_argument("--model-path", help="a checkpoint (default: the skewed default DeepSeek-V3, built on first use)")
    sc.add_argument("--router-skew", type=float, default=1.0, help="the default model's router skew (ALPHA)")
    sc.add_argument("--ep-size", type=int, default=4, help="the ranks it starts on")
    sc.add_argument("--ep-max-size", type=int, default=6)
    sc.add_argument("--sizes", default="6,3", help="the sizes asked for, in turn (default: %(default)s)")
    sc.add_argument("--ep-num-redundant-experts", type=int, default=4)
    sc.add_argument("--concurrency", type=int, default=16)
    sc.add_argument("--steady", type=float, default=8.0, help="seconds of load before the first request")
    sc.add_argument("--settle", type=float, default=8.0, help="seconds of load after each operation is done")
    sc.add_argument("--seed", type=int, default=0)
    sc.add_argument("--json", default="out/scale.json", help="the whole record (default: %(default)s)")
    sc.set_defaults(func=_cmd_bench_scale)

    hb = bench_sub.add_parser("head", help="node 0 lost under streaming clients, a standby head takes over "
                                           "(root: namespace hosts, etcd): takeover time, lost and differing "
                                           "requests, ranks restarted (JSON, PNG)")
    hb.add_argument("--model-path", help="a checkpoint (default: the default Qwen3-MoE, built on first use)")
    hb.add_argument("--schedules", default="killed,partitioned", help="node 0 killed and/or partitioned "
                                                                    "(default: %(default)s)")
    hb.add_argument("--concurrency", type=int, default=16)
    hb.add_argument("--max-tokens", type=int, default=40)
    hb.add_argument("--head-lease-ttl", type=float, default=2.0)
    hb.add_argument("--json", default="out/head.json", help="the whole record (default: %(default)s)")
    hb.add_argument("--plot", default="out/head.png", help="the picture (default: %(default)s)")
    hb.set_defaults(func=_cmd_bench_head)

    sim = sub.add_parser("sim", help="simulate one wide-EP instance on a GPU cluster through a failure (JSON, PNG)")
    sim_sub = sim.add_subparsers(dest="sim_command", required=True, metavar="REPORT")
    for name, what in (("paper", "one rank of 32 lost: every system's timeline beside the published figures"),
                       ("scale", "EP 32-1024: recovery pause, bytes moved, planning time, availability over 30 days")):
        s = sim_sub.add_parser(name, help=what)
        s.add_argument("--model-config", help="model shapes (default: eep/sim/data/deepseek_v3.json)")
        s.add_argument("--cluster", help="topology file (default: eep/sim/data/h800_cluster.json, H800 nodes)")
        s.add_argument("--json", default=f"out/sim-{name}.json", help="the whole record (default: %(default)s)")
        s.add_argument("--plot", default=f"out/sim-{name}.png", help="the picture (default: %(default)s)")
        if name == "scale":
            s.add_argument("--ep-sizes", default="32,64,128,256,512,1024", help="comma-separated EP sizes")
        s.set_defaults(func=_cmd_sim)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the main thread is, so a command unwinds as from Ctrl-C. A subclass
    on purpose: CPython 3.11 marks a plain KeyboardInterrupt that ends an `exec()` of a string
    (a dataclass being built by a lazy import, say) as unhandled even once it is caught, and
    then exits by SIGINT whatever code `main` returned; it checks the exact type."""


def _terminate(signum: int, frame: object) -> None:
    raise Terminated(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # SIGTERM unwinds a command like Ctrl-C, so what it started (a bench's servers and their
    # ranks) is stopped on the way out; `eep serve` installs its own handlers
    signal.signal(signal.SIGTERM, _terminate)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not args.verbose:  # a line per etcd call (leases are renewed every third of their TTL) is noise
        logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        return int(args.func(args))
    except EepError as e:
        print(f"eep: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("eep: interrupted", file=sys.stderr)
        return 130
