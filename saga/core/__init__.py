"""The pure core: saga definitions, state, events and the engine that decides.

Nothing here does I/O, reads a clock or draws a random number (an import-linter contract keeps
it so): time comes in as an argument and every id is derived from the saga's own data, so each
decision can be replayed and property-tested.
"""
