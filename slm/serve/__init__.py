"""An OpenAI-compatible chat endpoint for a checkpoint that train.py saved.

    python -m slm.serve --model runs/smoke/final --port 8000 --api-key KEY

`protocol` validates requests and shapes answers and errors as the `openai` package's types define them;
`worker` batches waiting requests through one decode thread; `stream` turns a request's tokens into
chat-completion deltas as they are decoded; `app` is the Starlette application. README: "Serving".
"""
