"""The Tornado service: REST and WebSocket API, protocol models, dispatch and the client."""
