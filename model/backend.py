"""The backend file (`backends/<name>_backend.py`) of the backend Keras runs on, chosen
once, when this module is first imported, as Keras chooses its backend's trainer class
once, at import (`keras/src/models/model.py`). Importing keras fixes the backend, so
import this only after `model.runtime.select_backend` has run.

Dependencies point one way, entry scripts -> model/ -> backends/: the backend files
never import model/; what a backend step needs is passed in (the module and its batch).
"""

from __future__ import annotations

import keras

from backends import backend_module

BACKEND = backend_module(keras.backend.backend())
