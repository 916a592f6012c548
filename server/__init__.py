"""The coordinator: Flower ServerApp, strategies, reports and the admin's commands.

Never imports ``client``; loads the ClientApp only by reference string, as Flower does.
"""
