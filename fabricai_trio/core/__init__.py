"""The core layer: what every other layer shares, importing nothing of ours.

Requests and messages, stream events and finish reasons, id shapes, and the domain
errors with the one table that maps them to every transport (DESIGN §1).
"""
