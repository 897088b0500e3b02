"""The JAX engine: fixed-shape state and the jitted simulation loop.

``kvpool``: paged KV blocks and the prefix cache of one instance; ``instance``: request slots and
vLLM V1's scheduler; ``cluster``: the loop over engine iterations with an instance axis.
"""
