"""BSBR: block-sparse attention with block retrieval (causal; see DESIGN.md). Not built yet."""
