"""The ``mgpumanager`` command: serve, check-config, demo, run."""

from __future__ import annotations

import argparse
import os
import sys

from .config import CONFIG_ENV, ConfigError, load_config


def cmd_check_config(args) -> int:
    try:
        cfg = load_config(args.file)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 1
    # The worker opens the lock file at boot: a path it cannot use would
    # stop it there, so say it here (as the user the broker runs as).
    from .oslock import lock_file_problem
    problem = lock_file_problem(cfg)
    if problem:
        print(f"{cfg.path}: scheduler.lock_file: {problem}", file=sys.stderr)
        return 1
    print(cfg.summary())
    return 0


def cmd_serve(args) -> int:
    if args.config:
        os.environ[CONFIG_ENV] = os.path.abspath(args.config)
    try:
        cfg = load_config()
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 1
    # One malloc arena keeps the worker's memory flat under large transfers;
    # glibc reads this only at start, so it must be in the environment.
    os.environ.setdefault("MALLOC_ARENA_MAX", "1")
    argv = [sys.executable, "-m", "gunicorn", "-c", "python:mgpumanager.gunicorn_conf"]
    if args.bind:
        argv += ["--bind", args.bind]
    print(f"mgpumanager: serving {cfg.path} on {args.bind or cfg.server.bind}", file=sys.stderr)
    os.execv(sys.executable, argv)
    return 0  # not reached


def cmd_demo(args) -> int:
    from .demo import run_demo
    return run_demo(bind=args.bind, traffic=not args.no_traffic, duration_s=args.duration,
                    any_ports=args.any_ports, gpus=args.gpus)


def cmd_run(args) -> int:
    from .runner import DEFAULT_URL, EXIT_REFUSED, read_token, run
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        print("mgpumanager run: no command (mgpumanager run [options] -- CMD ARGS...)",
              file=sys.stderr)
        return 2
    try:
        token = read_token(args.token_file)
    except OSError as e:
        print(f"mgpumanager run: --token-file: {e}", file=sys.stderr)
        return EXIT_REFUSED
    return run(cmd, url=args.url or os.environ.get("MGPUMANAGER_URL") or DEFAULT_URL,
               vram_mib=args.vram, label=args.label, ttl_s=args.ttl, wait_max_s=args.wait_max,
               grace_s=args.grace, token=token, gpus=args.gpu)


def _gpu_list(text: str) -> list[int]:
    try:
        indices = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"GPU indices like 0 or 0,1, not {text!r}") from None
    if any(i < 0 for i in indices) or len(set(indices)) != len(indices):
        raise argparse.ArgumentTypeError(f"distinct GPU indices like 0 or 0,1, not {text!r}")
    return indices


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mgpumanager",
                                description="One HTTP door to several local GPU services.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run the broker under gunicorn")
    s.add_argument("--config", help=f"config file (default ${CONFIG_ENV} or etc/consumers.yaml)")
    s.add_argument("--bind", help="HOST:PORT to listen on (default: server.bind)")
    s.set_defaults(func=cmd_serve)
    c = sub.add_parser("check-config", help="validate a config file: exit 0 and a summary, "
                       "or exit 1 and every problem")
    c.add_argument("file")
    c.set_defaults(func=cmd_check_config)
    d = sub.add_parser("demo", help="the broker in front of simulated consumers, with traffic")
    d.add_argument("--bind", default="127.0.0.1:8770", help="broker address (default %(default)s)")
    d.add_argument("--no-traffic", action="store_true", help="serve only; send no demo jobs")
    d.add_argument("--any-ports", action="store_true",
                   help="put the simulated services on free ports, not the fixed ones")
    d.add_argument("--duration", type=float, default=None,
                   help="stop after this many seconds (default: until Ctrl-C)")
    d.add_argument("--gpus", type=int, choices=(1, 2), default=1,
                   help="simulated GPUs: 2 puts ComfyUI on a 16 GiB card of its own, the "
                        "rest on a 12 GiB one (default %(default)s)")
    d.set_defaults(func=cmd_demo)
    r = sub.add_parser("run", help="run a command under a GPU lease: it waits its turn, room "
                       "is made for --vram, the GPU is held until it exits",
                       usage="mgpumanager run [options] -- CMD ARGS...")
    r.add_argument("--url", help="the broker (default $MGPUMANAGER_URL or http://127.0.0.1:8770)")
    r.add_argument("--vram", type=int, default=0, metavar="MIB",
                   help="VRAM to make room for, in MiB (default 0)")
    r.add_argument("--label", help="shown in the status (default: the command's name)")
    r.add_argument("--gpu", type=_gpu_list, metavar="N[,M]",
                   help="the GPU(s) to lease, by index; the command sees only them "
                        "(CUDA_VISIBLE_DEVICES). Default: every GPU, the command's environment "
                        "as it is")
    r.add_argument("--ttl", type=float, metavar="S",
                   help="end the lease (and stop the command) after S seconds "
                        "(default: scheduler.job_timeout_s)")
    r.add_argument("--wait-max", type=float, metavar="S",
                   help="give up (exit 75) after waiting S seconds for the GPU")
    r.add_argument("--grace", type=float, default=10.0, metavar="S",
                   help="after the lease ends: SIGTERM, then SIGKILL after S seconds (default 10)")
    r.add_argument("--token-file", metavar="PATH",
                   help="the broker's auth_token, read from this file (else $MGPUMANAGER_TOKEN)")
    r.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD ARGS...")
    r.set_defaults(func=cmd_run)
    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
