"""entropylens dashboard (Dash + Plotly): browse, compare and drill into entropy flows.

Start it with `entropylens app` or `app.server.serve(cache)`; it only reads run folders.
"""
