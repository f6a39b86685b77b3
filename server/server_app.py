"""Flower ServerApp: reads the run's federation config (<run-dir>/launch.json) and runs its rounds.

Everything else lives in fedsubtype.federation (rounds.py: the round loop, checkpoints and the final model).
"""

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedsubtype.federation.launch import read_launch
from fedsubtype.federation.rounds import run_rounds

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the federation that fedsubtype-server (or fedsubtype-sim) prepared in the run folder."""
    cfg, resume = read_launch(context.run_config)
    run_rounds(grid, cfg, resume)
