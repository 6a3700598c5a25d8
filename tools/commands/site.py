"""Site membership commands: ``p2pupd site ...``.

For the site operator (on the operator's machine, with the site directory):
``init`` makes the site key, ``enroll`` turns a node's enrolment request into
its membership document, ``revoke`` makes the next revocation list, ``list``
shows enrolled nodes. For a node: ``request`` writes its enrolment request,
``join`` installs its membership document, ``update`` takes a newer
revocation list. See docs/security-model.md#site-membership.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from p2pupd.daemon import api
from p2pupd.tools.commands.base import EXIT_OK, Adder, UsageError, now, out, state_dir
from p2pupd.tools.site.authority import PUB_FILE, REVOCATIONS_FILE, SiteAuthority

ENROL_PREFIX = "p2pupd-enrol-"
MEMBER_PREFIX = "p2pupd-member-"
SUFFIX = ".msgpack"


def _site_dir(args: argparse.Namespace) -> Path:
    return Path(args.site_dir)


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {what} {path}: {exc.strerror}") from None


def _dest(out_arg: str | None, default_name: str) -> Path:
    if out_arg is None:
        return Path(default_name)
    p = Path(out_arg)
    return p / default_name if p.is_dir() else p


def _when(t: int | None) -> str:
    return "never" if t is None else time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


def cmd_init(args: argparse.Namespace) -> int:
    site = SiteAuthority.init(_site_dir(args), args.name, now())
    doc = {"site": site.doc.name, "key_id": site.doc.key_id, "seal_id": site.doc.seal_id,
           "public": str(_site_dir(args) / PUB_FILE)}  # fmt: skip
    out(args, doc, lambda: print(
        f"site {site.doc.name}: key {site.doc.key_id[:16]}, seal key {site.doc.seal_id[:16]}\n"
        f"give {_site_dir(args) / PUB_FILE} to nodes (`p2pupd init --site`) and to the "
        "publisher (`export --encrypt-to`); keep site.key on this machine"
    ))  # fmt: skip
    return EXIT_OK


def _expires(args: argparse.Namespace, t: int) -> int | None:
    if args.expires_days is None:
        return None
    if args.expires_days <= 0:
        raise UsageError("--expires-days must be positive")
    return t + int(args.expires_days * 86400)


def cmd_enroll(args: argparse.Namespace) -> int:
    site = SiteAuthority(_site_dir(args))
    t = now()
    data, rec = site.enroll(_read(args.request, "enrolment request"), t, _expires(args, t))
    dest = _dest(args.out, f"{MEMBER_PREFIX}{rec.node_id.hex()}{SUFFIX}")
    api.atomic_write(dest, data)
    doc = {"node_id": rec.node_id.hex(), "serial": rec.serial, "expires": rec.expires,
           "membership": str(dest)}  # fmt: skip
    out(args, doc, lambda: print(
        f"enrolled node {rec.node_id.hex()[:12]} in site {site.doc.name} "
        f"(expires {_when(rec.expires)}): give {dest} to the node (`p2pupd site join`)"
    ))  # fmt: skip
    return EXIT_OK


def cmd_revoke(args: argparse.Namespace) -> int:
    site = SiteAuthority(_site_dir(args))
    data, rl, rec = site.revoke(args.node, now())
    dest = _dest(args.out, REVOCATIONS_FILE) if args.out else _site_dir(args) / REVOCATIONS_FILE
    if args.out:
        api.atomic_write(dest, data)
    doc = {"node_id": rec.node_id.hex(), "sequence": rl.sequence, "revoked": len(rl.entries),
           "revocations": str(dest)}  # fmt: skip
    out(args, doc, lambda: print(
        f"revoked node {rec.node_id.hex()[:12]}: revocation list {rl.sequence} "
        f"({len(rl.entries)} node(s)) in {dest}; members take it with `p2pupd site update` "
        "and pass it on to each other"
    ))  # fmt: skip
    return EXIT_OK


def cmd_list(args: argparse.Namespace) -> int:
    site = SiteAuthority(_site_dir(args))
    recs = site.records()
    doc = {
        "site": site.doc.name,
        "nodes": [
            {
                "node_id": r.node_id.hex(),
                "platform": r.platform,
                "enrolled": r.enrolled,
                "expires": r.expires,
                "revoked": r.revoked,
            }
            for r in recs
        ],
    }

    def human() -> None:
        print(f"{'NODE':<34} {'PLATFORM':<16} {'EXPIRES':<24} STATE")
        for r in recs:
            state = "revoked" if r.revoked is not None else "enrolled"
            print(f"{r.node_id.hex():<34} {r.platform:<16} {_when(r.expires):<24} {state}")

    out(args, doc, human)
    return EXIT_OK


def cmd_request(args: argparse.Namespace) -> int:
    data = api.enrol_request(state_dir(args))
    from p2pupd.protocol.site.membership import verify_enrol_request

    req = verify_enrol_request(data)
    dest = _dest(args.out, f"{ENROL_PREFIX}{req.node_id.hex()}{SUFFIX}")
    api.atomic_write(dest, data)
    out(args, {"node_id": req.node_id.hex(), "request": str(dest)}, lambda: print(
        f"wrote {dest}: the site operator enrols it with `p2pupd site enroll {dest.name}`"
    ))  # fmt: skip
    return EXIT_OK


def cmd_join(args: argparse.Namespace) -> int:
    doc = api.site_join(state_dir(args), _read(args.membership, "membership document"))
    out(args, doc, lambda: print(
        f"joined site {doc['name']}: credential expires "
        f"{_when((doc.get('credential') or {}).get('expires'))}"
    ))  # fmt: skip
    return EXIT_OK


def cmd_update(args: argparse.Namespace) -> int:
    doc = api.site_update(state_dir(args), _read(args.document, "site document"))
    if "site_version" in doc:
        out(args, doc, lambda: print(f"site document v{doc['site_version']} accepted"))
        return EXIT_OK
    out(args, doc, lambda: print(
        f"revocation list {doc['sequence']} ({doc['revoked']} node(s))"
        + ("" if doc["changed"] else ": already held")
    ))  # fmt: skip
    return EXIT_OK


def cmd_rotate(args: argparse.Namespace) -> int:
    site = SiteAuthority(_site_dir(args))
    site.rotate(now(), args.compromised)
    doc = {"site": site.doc.name, "version": site.doc.version, "key_id": site.doc.key_id}
    out(args, doc, lambda: print(
        f"site {site.doc.name} v{site.doc.version}: new key {site.doc.key_id[:16]}; give "
        f"{_site_dir(args) / PUB_FILE} to the members (`p2pupd site update`)"
        + ("; the old key is revoked: enrol every member again" if args.compromised else "")
    ))  # fmt: skip
    return EXIT_OK


def _group(_args: argparse.Namespace) -> int:
    raise UsageError("p2pupd site needs a command (see p2pupd site --help)")


def register(add: Adder) -> None:
    sp = add("site", _group, "site membership: who may join this site's swarm")
    sub = Adder(sp.add_subparsers(dest="site_command", metavar="COMMAND", required=True))

    s = sub("init", cmd_init, "make a site: site key, seal key and CA (operator machine)",
            json_opt=True)  # fmt: skip
    s.add_argument("site_dir", metavar="DIR", help="the site directory to create")
    s.add_argument("--name", required=True, help="the site's name (e.g. plant-7)")

    for name, fn, help_, arg, arg_help in (
        ("enroll", cmd_enroll, "certify a node's enrolment request", "request",
         "the node's p2pupd-enrol-*.msgpack"),
        ("revoke", cmd_revoke, "revoke an enrolled node: the next revocation list", "node",
         "node id (or a unique prefix of at least 4 hex digits)"),
    ):  # fmt: skip
        s = sub(name, fn, help_, json_opt=True)
        s.add_argument(arg, help=arg_help)
        s.add_argument("--site-dir", required=True, help="the site directory")
        s.add_argument("--out", help="file or directory to write the result to")
        if name == "enroll":
            s.add_argument(
                "--expires-days", type=float, help="credential lifetime (default: no expiry)"
            )
    s = sub("list", cmd_list, "list the site's enrolled nodes", json_opt=True)
    s.add_argument("--site-dir", required=True, help="the site directory")

    s = sub("request", cmd_request, "write this node's enrolment request", json_opt=True,
            state=True)  # fmt: skip
    s.add_argument("--out", help="file or directory (default: ./p2pupd-enrol-<node id>.msgpack)")
    s = sub("join", cmd_join, "install this node's membership document", json_opt=True, state=True)
    s.add_argument("membership", help="the p2pupd-member-*.msgpack from `site enroll`")
    s = sub("rotate", cmd_rotate, "replace the site key (site document N+1)", json_opt=True)
    s.add_argument("--site-dir", required=True, help="the site directory")
    s.add_argument(
        "--compromised",
        action="store_true",
        help="revoke the old key: credentials it issued are refused (re-enrol every node)",
    )
    s = sub("update", cmd_update, "take a newer revocation list or site document",
            json_opt=True, state=True)  # fmt: skip
    s.add_argument("document", help="revocations.msgpack (`site revoke`) or site.pub (`site rotate`)")
