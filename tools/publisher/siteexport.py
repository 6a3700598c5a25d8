"""One bundle for a whole site: the union of what each member of a site request needs.

A site request (protocol/request.py) holds the signed requests of several
nodes. Each member is planned exactly as a single node would be
(``export.releases_for_request``, with the member's own platform variant), so
each keeps its cheapest path -- a delta from its own installed version, say --
and the bundle carries the union: a blob that no member needs is not carried,
a release two members need travels once with the blobs of both paths.

A release's envelope travels whole when more than one member needs it: an
envelope patch is built against one held release, and the member that
imports the bundle may not hold that one. Roots are the union of what the
members lack (each carries only the roots newer than its own).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from p2pupd.protocol.request import SiteRequest
from p2pupd.tools.publisher.export import ExportSource, ReleaseSource, releases_for_request


def releases_for_site(
    source_for: Callable[[str], ExportSource], site: SiteRequest, *, use_deltas: bool = True
) -> tuple[list[ReleaseSource], dict[int, bytes], list[str]]:
    """Return (releases, roots, notes) of the smallest bundle for every member of ``site``.

    ``source_for(platform)`` gives the source to plan a member of that
    platform from. Raises what ``releases_for_request`` raises (e.g.
    ``MixAndMatchError`` if any member trusts another repository's root).
    """
    if len(site.members) == 1:
        m = site.collector
        return releases_for_request(source_for(m.platform), m, use_deltas=use_deltas)
    merged: dict[bytes, ReleaseSource] = {}  # by the envelope's payload digest
    roots: dict[int, bytes] = {}
    notes: list[str] = []
    for m in site.members:
        rels, member_roots, member_notes = releases_for_request(
            source_for(m.platform), m, use_deltas=use_deltas
        )
        roots.update(member_roots)
        notes.extend(f"node {m.node_id.hex()[:12]}: {n}" for n in member_notes)
        for rel in rels:
            key = rel.envelope.payload_digest()
            if key in merged:
                merged[key].blobs.update(rel.blobs)
            else:
                merged[key] = replace(rel, blobs=dict(rel.blobs), base=None)
    return list(merged.values()), dict(sorted(roots.items())), notes
