"""Flower ClientApp: Messages in, `fedsubtype.federation.site_algo.SiteAlgo` calls, Messages out — nothing else.

The site's settings come from the SuperNode's node config (`site-config` = path to site.yaml), never from
the coordinator. A reply carries the weights (only masked under secure aggregation), one MetricRecord with
exactly the allow-listed aggregate keys, and the site's name. A failure is logged in full at the site and
reported to the coordinator only as its exception type, so no path or case id leaks through an error message.
"""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedsubtype.errors import UserError
from fedsubtype.federation.secagg_mod import secure_aggregation_mod
from fedsubtype.federation.site_algo import SiteAlgo
from fedsubtype.privacy.limits import RoundDeclined
from fedsubtype.privacy.site_level import site_level_clipping_mod
from fedsubtype.federation.site_config import load_site_config
from fedsubtype.federation.site_node import SITE_CONFIG_KEY
from fedsubtype.federation.transport import LAYOUT_KEY, pack, unpack

# Both mods pass messages through unless the round asks for them: SecAgg+ masking of the (clipped) update
# (fedsubtype/federation/secagg_mod.py) wraps site-level clipping, so the clipped update is what gets masked.
app = ClientApp(mods=[secure_aggregation_mod, site_level_clipping_mod])
_ALGOS: dict[str, SiteAlgo] = {}
_log = logging.getLogger("fedsubtype.site")


def _algo(context: Context) -> SiteAlgo:
    """The site's SiteAlgo (one per process, initialised on first use)."""
    path = context.node_config.get(SITE_CONFIG_KEY)
    if not path:
        raise UserError("the SuperNode was started without a site config",
                        f"start it with fedsubtype-client --site site.yaml (node config '{SITE_CONFIG_KEY}')")
    key = str(Path(str(path)).resolve())
    if key not in _ALGOS:
        site = load_site_config(key)
        _ALGOS[key] = SiteAlgo(site, log=_log.info).initialize(warm=False)  # fedsubtype-client warmed it
    return _ALGOS[key]


def prepare_site(site_config: str) -> None:
    """Load the site's SiteAlgo ahead of the first message (used by the site's warm executor)."""
    _algo(Context(run_id=0, node_id=0, node_config={SITE_CONFIG_KEY: site_config}, state=RecordDict(), run_config={}))


def _guarded(kind: str, body):
    """Run a handler body; keep the full error at the site, send only its type to the coordinator."""
    try:
        return body()
    except RoundDeclined as exc:  # limits or privacy budget: the reason holds only limits and ε figures
        _log.warning("site declined %s: %s", kind, exc.line())
        raise RuntimeError(exc.line()) from None
    except Exception as exc:  # noqa: BLE001 - everything must be sanitised before it leaves the site
        _log.exception("site %s failed", kind)
        raise RuntimeError(f"site {kind} failed ({type(exc).__name__}); details are in the site's log") from None


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Local training round from the global weights."""
    def body() -> Message:
        algo = _algo(context)
        config = dict(msg.content["config"]) if "config" in msg.content else {}
        layout = config.get(LAYOUT_KEY)
        weights = unpack(msg.content["arrays"].to_numpy_ndarrays(), layout)
        new_weights, _, metrics = algo.train(weights, config)
        content = RecordDict({"arrays": ArrayRecord(pack(new_weights) if layout else new_weights),
                              "metrics": MetricRecord(metrics),
                              "site": ConfigRecord({"name": algo.site.name})})
        return Message(content=content, reply_to=msg)
    return _guarded("training", body)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Score the global weights on the site's local validation split."""
    def body() -> Message:
        algo = _algo(context)
        config = dict(msg.content["config"]) if "config" in msg.content else {}
        weights = unpack(msg.content["arrays"].to_numpy_ndarrays(), config.get(LAYOUT_KEY))
        _, metrics = algo.evaluate(weights, config)
        content = RecordDict({"metrics": MetricRecord(metrics), "site": ConfigRecord({"name": algo.site.name})})
        return Message(content=content, reply_to=msg)
    return _guarded("evaluation", body)
