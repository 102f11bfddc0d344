"""The Cellblock Jupyter kernel: cell sections to submissions, live status in the cell."""
