"""`loraserve` commands that talk to a running server: generate/call, adapters, usage; and tenants' keys.

Every remote command takes --target, --api-key (or LORASERVE_API_KEY) and the TLS options. Output is a
short table for people, or JSON with --json. Exit codes: 0 ok, 2 bad input (INVALID_ARGUMENT, NOT_FOUND,
UNAUTHENTICATED, PERMISSION_DENIED, ...), 1 anything else.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

DEFAULT_TARGET = "127.0.0.1:50051"
_BAD_INPUT = ("INVALID_ARGUMENT", "NOT_FOUND", "ALREADY_EXISTS", "FAILED_PRECONDITION", "UNAUTHENTICATED",
              "PERMISSION_DENIED", "OUT_OF_RANGE")


def add_client_args(p: argparse.ArgumentParser, offline_default: bool = False) -> None:
    """`offline_default`: no --target means "run offline" (generate), so it has no default."""
    g = p.add_argument_group("server")
    if offline_default:
        g.add_argument("--target", help="HOST:PORT of a running server: generate there instead of loading the "
                       "model here (--adapter is then a name on the server)")
    else:
        g.add_argument("--target", default=os.environ.get("LORASERVE_TARGET", DEFAULT_TARGET),
                       help="HOST:PORT of the server (default: $LORASERVE_TARGET or %(default)s)")
    g.add_argument("--api-key", default=os.environ.get("LORASERVE_API_KEY"),
                   help="API key, sent as 'authorization: Bearer <key>' (default: $LORASERVE_API_KEY)")
    g.add_argument("--tls", action="store_true", help="connect with TLS (system roots unless --tls-ca)")
    g.add_argument("--tls-ca", metavar="PEM", help="CA certificate that signed the server's (implies --tls)")
    g.add_argument("--tls-cert", metavar="PEM", help="client certificate for mTLS (implies --tls)")
    g.add_argument("--tls-key", metavar="PEM", help="client private key for mTLS")
    g.add_argument("--timeout", type=float, help="deadline of each call in seconds (default: none)")
    g.add_argument("--json", action="store_true", help="print JSON instead of a table")


def make_client(args: argparse.Namespace):  # noqa: ANN201 - LoraServeClient (imported lazily: grpc)
    from service.client import LoraServeClient

    def read(path: str | None) -> bytes | None:
        if path is None:
            return None
        with open(path, "rb") as f:
            return f.read()

    return LoraServeClient(args.target, api_key=args.api_key, timeout=args.timeout, tls=args.tls,
                           root_certificates=read(args.tls_ca), client_cert=read(args.tls_cert),
                           client_key=read(args.tls_key))


def run_remote(fn: Callable[[Any], int], args: argparse.Namespace) -> int:
    import grpc

    try:
        with make_client(args) as client:
            return fn(client)
    except grpc.RpcError as e:
        hint = " (give the key with --api-key or LORASERVE_API_KEY)" if e.code().name == "UNAUTHENTICATED" else ""
        print(f"\nerror: {e.code().name}: {e.details()}{hint}", file=sys.stderr)
        return 2 if e.code().name in _BAD_INPUT else 1


def _as_dict(message: Any) -> dict[str, Any]:
    from google.protobuf.json_format import MessageToDict

    return MessageToDict(message, preserving_proto_field_name=True)


def _print(args: argparse.Namespace, messages: list[Any], columns: list[tuple[str, Callable[[Any], Any]]]) -> None:
    if args.json:
        print(json.dumps([_as_dict(m) for m in messages], indent=2))
        return
    rows = [[str(get(m)) for _, get in columns] for m in messages]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, (h, _) in enumerate(columns)]
    print("  ".join(h.upper().ljust(w) for (h, _), w in zip(columns, widths)).rstrip())
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())


# ---- generate ------------------------------------------------------------------------------------
def _labels(items: Sequence[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise SystemExit(f"error: --label {item!r} is invalid: expected KEY=VALUE")
        out[key] = value
    return out


def add_format_args(p: argparse.ArgumentParser) -> None:
    """--json-schema / --json-object / --regex / --choice / --grammar: at most one."""
    g = p.add_argument_group("response format (at most one)").add_mutually_exclusive_group()
    g.add_argument("--json-schema", metavar="FILE", help="the answer is JSON valid against this JSON Schema file")
    g.add_argument("--json-object", action="store_true", help="the answer is a JSON object")
    g.add_argument("--regex", metavar="REGEX", help="the whole answer matches this regular expression")
    g.add_argument("--choice", action="append", metavar="TEXT", help="the answer is one of these (repeatable)")
    g.add_argument("--grammar", metavar="FILE", help="the answer is a sentence of this grammar (xgrammar EBNF, "
                   "rule `root`)")


def format_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The response format the flags ask for, as LoraServeClient keyword arguments ({} for none)."""
    def read(path: str) -> str:
        with open(path, encoding="utf-8") as f:
            return f.read()

    if args.json_schema:
        return {"json_schema": read(args.json_schema)}
    if args.json_object:
        return {"json_object": True}
    if args.regex is not None:
        return {"regex": args.regex}
    if args.choice:
        return {"choice": list(args.choice)}
    if args.grammar:
        return {"grammar": read(args.grammar)}
    return {}


def _tool_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    if args.tools is None:
        if args.tool_choice is not None:
            raise SystemExit("--tool-choice needs --tools FILE")
        return {}
    if args.raw:
        raise SystemExit("--tools needs a chat: drop --raw")
    try:
        with open(args.tools, encoding="utf-8") as f:
            tools = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"--tools {args.tools}: {e}") from None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise SystemExit(f"--tools {args.tools}: must hold a JSON list of tool objects")
    return {"tools": tools, "tool_choice": args.tool_choice}


def cmd_call(args: argparse.Namespace) -> int:
    kwargs = dict(adapter=args.adapter or "", chat=not args.raw, system=args.system, max_tokens=args.max_tokens,
                  temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                  speculation=args.speculation, max_draft_tokens=args.max_draft_tokens,
                  stop=tuple(args.stop or ()), labels=_labels(getattr(args, "label", None) or ()),
                  **format_kwargs(args), **_tool_kwargs(args))

    def go(client: Any) -> int:
        if args.json:  # the whole response (unary), or one line per streamed message
            if args.stream:
                for msg in client.generate_stream_messages(args.prompt, **kwargs):
                    print(json.dumps(_as_dict(msg)), flush=True)
            else:
                print(json.dumps(_as_dict(client.generate(args.prompt, **kwargs)), indent=2))
            return 0
        calls: list[Any] = []
        said = False
        if args.stream:
            for msg in client.generate_stream_messages(args.prompt, **kwargs):
                sys.stdout.write(msg.text)
                sys.stdout.flush()
                said = said or bool(msg.text)
                calls.extend(msg.tool_calls)
        else:
            response = client.generate(args.prompt, **kwargs)
            sys.stdout.write(response.text)
            said = bool(response.text)
            calls.extend(response.tool_calls)
        if said or not calls:  # an answer of calls alone prints only them
            sys.stdout.write("\n")
        for call in calls:
            try:  # one line a call: the arguments as compact JSON (as the model wrote them if they do not parse)
                arguments = json.dumps(json.loads(call.arguments), ensure_ascii=False)
            except ValueError:
                arguments = call.arguments
            print(f"tool_call {call.name} {arguments}")
        return 0

    return run_remote(go, args)


# ---- adapters ------------------------------------------------------------------------------------
_STATES = {0: "?", 1: "stored", 2: "loading", 3: "loaded", 4: "failed"}
_VIS = {0: "?", 1: "private", 2: "shared", 3: "public"}
_VERSION_COLUMNS = [("owner", lambda v: v.owner), ("name", lambda v: v.name), ("#", lambda v: v.number),
                    ("version", lambda v: v.version_id), ("rank", lambda v: v.rank),
                    ("targets", lambda v: ",".join(v.target_modules)), ("bytes", lambda v: v.size_bytes),
                    ("state", lambda v: _STATES.get(v.load_state, "?"))]


def cmd_adapters(args: argparse.Namespace) -> int:
    def go(c: Any) -> int:
        action = args.adapters_command
        if action == "upload":
            r = c.upload_adapter(args.dir, args.name, description=args.description or "",
                                 visibility=args.visibility, promote=False if args.no_promote else None)
            if not args.json:
                print(f"{'uploaded' if r.created else 'already there:'} {r.version.owner}/{r.version.name}"
                      f"@{r.version.number} ({r.version.version_id}){', current' if r.current else ''}")
                return 0
            _print(args, [r], [])
        elif action == "list":
            _print(args, c.list_adapters(), [
                ("owner", lambda a: a.owner), ("name", lambda a: a.name),
                ("current", lambda a: f"@{a.current_version.number} {a.current_version.version_id}"),
                ("versions", lambda a: a.num_versions), ("visibility", lambda a: _VIS.get(a.visibility, "?"))])
        elif action == "get":
            _print(args, list(c.get_adapter(args.name).versions), _VERSION_COLUMNS)
        elif action == "promote":
            v = c.promote_adapter(args.name, args.version)
            if args.json:
                _print(args, [v], [])
            else:
                print(f"{v.owner}/{v.name} -> @{v.number} ({v.version_id})")
        elif action == "delete":
            released = c.delete_adapter(args.ref)
            if args.json:
                print(json.dumps({"deleted": args.ref, "released_version_ids": released}, indent=2))
            else:
                print(f"deleted {args.ref}" + (f"; released {', '.join(released)}" if released else ""))
        elif action == "load":
            r = c.load_adapter(args.ref, wait=True)
            _print(args, [r.version], _VERSION_COLUMNS)
            if r.error:
                print(f"error: {r.error}", file=sys.stderr)
                return 1
        elif action == "unload":
            _print(args, [c.unload_adapter(args.ref)], _VERSION_COLUMNS)
        elif action == "share":
            a = c.share_adapter(args.name, grant=args.grant or (), revoke=args.revoke or ())
            if args.json:
                _print(args, [a], [])
            else:
                print(f"{a.owner}/{a.name}: {_VIS.get(a.visibility, '?')}"
                      + (f", shared with {', '.join(a.shared_with)}" if a.shared_with else ""))
        return 0

    return run_remote(go, args)


# ---- usage ---------------------------------------------------------------------------------------
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """`90s`, `15m`, `24h`, `7d` -> seconds."""
    try:
        value, unit = float(text[:-1]), text[-1]
        if unit not in _UNITS or not math.isfinite(value):
            raise ValueError
    except (ValueError, IndexError):
        raise ValueError(f"duration {text!r} is invalid: use a number and a unit, e.g. 90s, 15m, 24h, 7d") from None
    if value <= 0:
        raise ValueError(f"duration {text!r} is invalid: it must be longer than 0")
    return value * _UNITS[unit]


def cmd_usage(args: argparse.Namespace) -> int:
    start = time.time() - parse_duration(args.since) if args.since else None
    bucket = parse_duration(args.bucket) if args.bucket else None

    def go(c: Any) -> int:
        rows = c.get_usage(tenant=args.tenant or "", adapter=args.adapter or "", group_by=args.group_by,
                           start_time=start, bucket_s=bucket)
        # with buckets, each row's bucket start (local time) comes first
        when = [("bucket", lambda r: time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.start_time.seconds)))] \
            if bucket else []
        _print(args, rows, [
            *when, ("tenant", lambda r: r.tenant), ("adapter", lambda r: r.adapter or "-"),
            ("version", lambda r: r.adapter_version or "-"), ("requests", lambda r: r.requests),
            ("input", lambda r: r.input_tokens), ("cached", lambda r: r.cached_input_tokens),
            ("output", lambda r: r.output_tokens), ("engine_s", lambda r: f"{r.engine_seconds:.3f}"),
            ("cost", lambda r: f"{r.estimated_cost:.6f} {r.cost_unit}"),
            ("failed", lambda r: r.failed_requests), ("cancelled", lambda r: r.cancelled_requests)])
        return 0

    return run_remote(go, args)


def cmd_fair_share(args: argparse.Namespace) -> int:
    def go(c: Any) -> int:
        resp = c.get_fair_share(tenant=args.tenant or "")
        if not args.json:
            print(f"policy: {resp.policy} (a prompt token computed costs {resp.input_token_weight:g}, a generated "
                  f"token {resp.output_token_weight:g}; service = cost / weight)")
        _print(args, resp.tenants, [
            ("tenant", lambda s: s.tenant), ("weight", lambda s: f"{s.weight:g}"),
            ("service", lambda s: f"{s.service:.0f}"), ("requests", lambda s: s.requests)])
        return 0

    return run_remote(go, args)


# ---- tenants (local) -----------------------------------------------------------------------------
def cmd_tenants(args: argparse.Namespace) -> int:
    from service.tenants import generate_api_key, hash_api_key

    if args.tenants_command == "new-key":
        key = generate_api_key()
        print(f"key:  {key}\nhash: {hash_api_key(key)}   <- put this line in the tenants file's api_keys")
        return 0
    key = args.key if args.key is not None else sys.stdin.readline().rstrip("\n")
    print(hash_api_key(key))
    return 0


def add_commands(sub: argparse._SubParsersAction, add_generation_args: Callable[[argparse.ArgumentParser], None]
                 ) -> None:
    c = sub.add_parser("call", help="generate once through a running server and print the answer",
                       description="Generate through a running loraserve server; the answer goes to stdout.")
    c.add_argument("--prompt", required=True, help="the user message (or plain text with --raw)")
    c.add_argument("--adapter", metavar="REF", help="adapter: name[@version] (yours, else the service's) or "
                   "owner/name[@version]")
    c.add_argument("--stream", action="store_true", help="print the answer as it is generated")
    c.add_argument("--label", action="append", metavar="KEY=VALUE",
                   help="your own label, recorded with the request's usage and trace (repeatable)")
    c.add_argument("--tools", metavar="FILE", help="a JSON file with a list of tools the answer may call (OpenAI's "
                   "{\"type\": \"function\", \"function\": {name, description, parameters}} each); calls are "
                   "printed as `tool_call NAME ARGUMENTS` lines")
    c.add_argument("--tool-choice", metavar="auto|none|required|NAME",
                   help="how the answer may call the tools: auto (default), none, required, or one tool's name")
    add_generation_args(c)
    add_format_args(c)
    add_client_args(c)
    c.set_defaults(func=cmd_call, log_level="warning")

    a = sub.add_parser("adapters", help="upload, list, promote, share, load and delete adapters on a server")
    asub = a.add_subparsers(dest="adapters_command", required=True)
    up = asub.add_parser("upload", help="upload a PEFT adapter directory as a new version of NAME")
    up.add_argument("dir", help="directory with adapter_config.json + adapter_model.safetensors")
    up.add_argument("--name", required=True, help="the adapter's name (a new version if it exists)")
    up.add_argument("--description", help="free text about this version")
    up.add_argument("--visibility", choices=("private", "shared", "public"), help="who may use it")
    up.add_argument("--no-promote", action="store_true", help="keep the current version current")
    asub.add_parser("list", help="the adapters you can see")
    g = asub.add_parser("get", help="one adapter's versions")
    g.add_argument("name", help="name or owner/name")
    pr = asub.add_parser("promote", help="point NAME at VERSION (rollback = promote an older one)")
    pr.add_argument("name", help="name or owner/name")
    pr.add_argument("version", help="version number (1, 2, ...) or id (v-...)")
    d = asub.add_parser("delete", help="delete an adapter (name) or one non-current version (name@version)")
    d.add_argument("ref")
    lo = asub.add_parser("load", help="load a version into memory and keep it there")
    lo.add_argument("ref", help="name[@version] or owner/name[@version]")
    un = asub.add_parser("unload", help="let a loaded version be evicted again")
    un.add_argument("ref")
    sh = asub.add_parser("share", help="grant or revoke other tenants' use ('*' = everyone)")
    sh.add_argument("name")
    sh.add_argument("--grant", action="append", metavar="TENANT")
    sh.add_argument("--revoke", action="append", metavar="TENANT")
    for p in asub.choices.values():
        add_client_args(p)
        p.set_defaults(func=cmd_adapters, log_level="warning")

    u = sub.add_parser("usage", help="usage per adapter (or tenant) from a server's ledger")
    u.add_argument("--tenant", help="another tenant's usage ('*' = all; admins only)")
    u.add_argument("--adapter", help="only this adapter (name, owner/name, @version; '-' = base model)")
    u.add_argument("--group-by", choices=("tenant", "adapter", "adapter_version"), default="adapter")
    u.add_argument("--since", help="window start, as a duration back from now (e.g. 24h, 7d); default: all")
    u.add_argument("--bucket", help="split the window into buckets of this length (e.g. 1h)")
    add_client_args(u)
    u.set_defaults(func=cmd_usage, log_level="warning")

    f = sub.add_parser("fair-share", help="where tenants stand in the server's fair-share scheduler")
    f.add_argument("--tenant", help="another tenant ('*' = all; admins only)")
    add_client_args(f)
    f.set_defaults(func=cmd_fair_share, log_level="warning")

    t = sub.add_parser("tenants", help="make and hash API keys for the tenants file (local, no server)")
    tsub = t.add_subparsers(dest="tenants_command", required=True)
    hk = tsub.add_parser("hash-key", help="print the sha256:... line to store for an API key")
    hk.add_argument("key", nargs="?", help="the key (default: read one line from stdin)")
    tsub.add_parser("new-key", help="generate a random API key and print it with its hash")
    for p in tsub.choices.values():
        p.set_defaults(func=cmd_tenants, log_level="warning")
