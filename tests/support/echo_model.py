"""A trivial models-from-code pyfunc for registry and serving tests: answers with a fixed text."""

import mlflow
from mlflow.pyfunc import PythonModel


class EchoModel(PythonModel):
    def predict(self, context, model_input, params=None):
        return [f"echo: {prompt}" for prompt in model_input["prompt"]]


mlflow.models.set_model(EchoModel())
