"""The MCP tool-call gateway: JSON-RPC messages (`messages`), their judgement (`policy`) and the
handler the egress gateway runs for `mcp.gateway` (`gateway`). See docs/mcp.md."""
