"""Signed deletion receipts: the signature convention, the signing keys, the printable page.

Nothing here touches the database or imports torch: `signing` is all a verifier needs (the
`lethe receipt verify` command uses it offline), `keys` loads or creates the private key,
`page` and `plots` render the HTML page. Building and storing receipts is
`app.services.receipts`.
"""
