"""One module per kernel library. Each defines `BACKEND` and imports its library lazily."""
