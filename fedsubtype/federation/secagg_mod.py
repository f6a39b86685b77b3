"""The site's side of secure aggregation: Flower's own `secaggplus_mod`, adapted to fedsubtype's train replies.

Flower's mod speaks the legacy fit format (a `FitRes` with `fitres.parameters` and `fitres.num_examples`).
This adapter hands it the site's *update* (trained weights minus the global weights received) and example
count in that format, lets it quantise, weight and mask them, and returns the reply in fedsubtype's format:
the allow-listed metrics, the site's name and the masked vector, with no array record at all — no plain
weight leaves the site. Messages without SecAgg+ stage data (evaluation, plain rounds) pass through.
"""

from __future__ import annotations

import importlib
import logging

import numpy as np
from flwr.app import Context, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Code, FitRes, Status, bytes_to_ndarray, ndarray_to_bytes, ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE, Key
from flwr.compat.common.recorddict_compat import fitres_to_recorddict

from fedsubtype.federation.secure_aggregation import mask_generator

# Flower's mod draws every mask from `pseudo_rand_gen`, which seeds NumPy's RandomState with 32 bits of the
# secret; here it expands them with the full-entropy generator the coordinator (secagg_round.py) uses too.
# The patch goes on the module (its package exports the mod function under the module's name).
FLOWER_MOD = importlib.import_module("flwr.client.mod.secure_aggregation.secaggplus_mod")
if not callable(getattr(FLOWER_MOD, "pseudo_rand_gen", None)):  # a Flower that moved it would mask with 32 bits
    raise ImportError("flwr's secaggplus_mod no longer has pseudo_rand_gen: fedsubtype cannot replace its mask "
                      "generator; install the flwr version fedsubtype pins (pyproject.toml)")
FLOWER_MOD.pseudo_rand_gen = mask_generator
_log = logging.getLogger("fedsubtype.site")
REPLY_RECORDS = ("metrics", "site", RECORD_KEY_CONFIGS)
"""The records a secure-aggregation reply carries (metrics, the site's name, the protocol's data)."""


def is_secure_stage(msg: Message) -> bool:
    """Whether `msg` is one stage of a SecAgg+ round."""
    return msg.metadata.message_type == MessageType.TRAIN and RECORD_KEY_CONFIGS in msg.content.config_records


def update_as_fitres(msg: Message, reply: Message, ctxt: Context) -> Message:
    """The site's reply with its update and count in Flower's fit format (for `secaggplus_mod`)."""
    sent = msg.content["arrays"].to_numpy_ndarrays()
    trained = reply.content["arrays"].to_numpy_ndarrays()
    update = [t.astype(np.float64) - s.astype(np.float64) for s, t in zip(sent, trained)]
    count = int(reply.content["metrics"]["num-examples"])
    warn_if_clipped(update, count, ctxt)
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(update), count, {})
    content = fitres_to_recorddict(fitres, keep_input=False)
    for key in ("metrics", "site"):
        content[key] = reply.content[key]
    return Message(content, reply_to=msg)


def warn_if_clipped(update: list[np.ndarray], count: int, ctxt: Context) -> None:
    """Say in the site's log how many update values the quantiser will clip (the coordinator cannot see it)."""
    state = ctxt.state.config_records.get(RECORD_KEY_STATE)
    if state is None or not float(state.get("max_weight", 0.0)):
        return
    scaled_limit = float(state["clipping_range"]) * float(state["max_weight"]) / max(count, 1)
    clipped = sum(int((np.abs(u) > scaled_limit).sum()) for u in update)
    if clipped:
        _log.warning("secure aggregation: %d update values exceed ±%.3g and are clipped; raise "
                     "secure_aggregation.clipping_range in federation.yaml", clipped, scaled_limit)


def secure_aggregation_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Run Flower's SecAgg+ client stages on fedsubtype's messages; a failure names only its stage and type."""
    if not is_secure_stage(msg):
        return call_next(msg, ctxt)
    from_handler: list[BaseException] = []

    def train(m: Message, c: Context) -> Message:
        # the inner mods and the handler see the plain training message (site-level clipping reads its one
        # config record); Flower's mod has already taken the protocol data it needs
        protocol = m.content.config_records.pop(RECORD_KEY_CONFIGS)
        try:
            reply = call_next(m, c)
        except BaseException as exc:  # already sanitised by the ClientApp's handler
            from_handler.append(exc)
            raise
        finally:
            m.content[RECORD_KEY_CONFIGS] = protocol
        return update_as_fitres(m, reply, c)

    stage = str(msg.content[RECORD_KEY_CONFIGS].get(Key.STAGE, "?"))
    try:
        out = secaggplus_mod(msg, ctxt, train)
    except Exception as exc:  # noqa: BLE001 - only the stage and type leave the site
        if from_handler and exc is from_handler[0]:
            raise
        _log.exception("secure aggregation stage %s failed", stage)
        raise RuntimeError(f"secure aggregation stage {stage} failed at the site ({type(exc).__name__}); "
                           "details are in the site's log") from None
    content = RecordDict({k: out.content[k] for k in REPLY_RECORDS if k in out.content})
    protocol = content[RECORD_KEY_CONFIGS]
    if Key.MASKED_PARAMETERS in protocol:  # values below the 2^32 modulus: 4 bytes each, as the plain weights
        protocol[Key.MASKED_PARAMETERS] = [ndarray_to_bytes(bytes_to_ndarray(b).astype(np.uint32))
                                           for b in protocol[Key.MASKED_PARAMETERS]]
    return Message(content, reply_to=msg)

