"""HTTP routers, one module per resource; handlers parse, call one service, shape the reply."""
