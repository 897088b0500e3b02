"""Prefill/decode disaggregation (REFERENCE.md §1.7): the KV transfer of a hand-off.

A prefill instance computes the prompt and the first token, then hands the request off to the
decode instance picked when it arrived; the KV goes over the link between the two (the node's
link, or the link between nodes) layer by layer during the prefill (or all at once after it).
The request joins its decode instance's queue when its last layer has arrived: a *release*
(engine/routing.py ``Releases``), which the loop handles like an arrival.
"""

import jax.numpy as jnp

from jaxsim.engine.instance import I32, I64, NEVER
from jaxsim.engine.routing import PREFILL


def kv_transfer(st, prm, ending, now):
    """KV sent by the prefill instances whose iteration ends ``now`` (REFERENCE.md §1.7).

    Every request that will be handed off sends the KV of the tokens computed for it in the
    iteration (plus, on its first chunk, its prefix-hit tokens: the decode side needs them too):
    per layer and TP rank, ``kv_token_bytes / (L * tp)`` bytes per token (ranks send their shards in
    parallel). One layer's messages leave back to back on the instance's link, so a layer takes
    ``s = latency + Σ bytes / bw``, each request on the link level (within the node, or between
    nodes) of its decode instance, with the largest latency among them.

    Layer-wise streaming (``kv_layerwise``) overlaps the compute: layer i's KV leaves when layer i
    is done (the iteration split evenly over its L layers, period p) and the link is free, so the
    last layer arrives at ``max(end + s, start + p + L*s, link_free + L*s)``: compute-bound,
    link-bound, or still busy with earlier KV. Otherwise a request's whole prompt KV leaves when its
    prefill ends: ``max(end, link_free) + latency + L * Σ bytes / bw`` for the requests done now.

    Returns ``(ready, sent_bytes, link_free)``: per slot ``[inst, slot]`` the arrival time of the
    last KV layer of a request whose prefill completed now (NEVER elsewhere), and the bytes sent
    (all layers and ranks); and each instance's new link-free time.
    """
    s = st.inst.slots
    req = jnp.maximum(s.req, 0)
    leaving = ((prm.role == PREFILL) & ending)[:, None] & (s.sched_n > 0) & s.first & (s.target - s.prompt > 1)
    completes = leaving & (s.computed >= s.prompt)
    first_chunk = s.sched_c == jnp.maximum(s.prefix_hit, 0)
    streamed = s.sched_n + jnp.where(first_chunk, s.sched_c, 0)
    sent = jnp.where(prm.kv_layerwise[:, None], jnp.where(leaving, streamed, 0), jnp.where(completes, s.prompt, 0))
    dest = st.releases.dest[req]
    level = (prm.node[jnp.maximum(dest, 0)] != prm.node[:, None]).astype(I32)  # 0 within the node, 1 across
    bw = jnp.take_along_axis(prm.kv_link_bw, level, axis=1)
    lat = jnp.where(sent > 0, jnp.take_along_axis(prm.kv_link_latency, level, axis=1), 0.0)
    layers = prm.num_layers.astype(jnp.float64)
    per_rank_layer = prm.kv_token_bytes.astype(jnp.float64) / (layers * prm.tp.astype(jnp.float64))
    wire = jnp.sum(sent.astype(jnp.float64) * per_rank_layer[:, None] / bw, axis=1)  # one layer, ns
    latency = jnp.max(lat, axis=1)
    s_layer = latency + wire
    # Offsets from now (exact int64 differences; the float parts are < one run's span)
    since_start = (now - st.inst.batch_start).astype(jnp.float64)
    backlog = (st.link_free - now).astype(jnp.float64)  # > 0: the link is still sending
    streamed_end = jnp.maximum(jnp.maximum(s_layer, since_start / layers - since_start + layers * s_layer),
                               backlog + layers * s_layer)
    whole_end = jnp.maximum(backlog, 0.0) + latency + layers * wire
    done = now + jnp.ceil(jnp.where(prm.kv_layerwise, streamed_end, whole_end)).astype(I64)
    link_free = jnp.where(jnp.any(sent > 0, axis=1), done, st.link_free)
    ready = jnp.where(completes, done[:, None], NEVER)
    return ready, sent.astype(I64) * prm.kv_token_bytes[:, None], link_free
