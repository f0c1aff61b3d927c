# The web demo (app.py) in a container: what a Hugging Face Docker Space builds (README: "Web demo and Space").
#   docker build -t captioning . && docker run --rm -p 8501:8501 captioning       # then open http://localhost:8501
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# The CPU build of torch, installed first so that requirements.txt finds torch there: the default PyPI wheel on
# Linux is a multi-GB CUDA build, which a CPU Space cannot use. On a GPU Space, leave out --index-url (or name the
# CUDA build's index, e.g. https://download.pytorch.org/whl/cu126) and pick GPU hardware in the Space's settings.
RUN pip install torch torchvision --index-url https://download.pytorch.org/whl/cpu
COPY requirements.txt requirements-app.txt /app/
RUN pip install -r /app/requirements-app.txt

# Hugging Face runs a Space's container as the user of uid 1000. Its home is the one folder it writes: Streamlit's
# ~/.streamlit, ~/.cache, and the feature cache (train.cache_dir, cache/features under the working folder). The
# code, the shipped model and the example photos belong to root: the app only reads them.
RUN useradd --create-home --uid 1000 user
ENV HOME=/home/user
WORKDIR /home/user/app
COPY app.py config.py utils.py ./
COPY .streamlit/ .streamlit/
COPY data/ data/
COPY models/ models/
COPY evaluation/ evaluation/
COPY reports/ reports/
COPY pretrained/ pretrained/
COPY examples/ examples/
COPY demo_images/ demo_images/
RUN install -d -o user -g user cache

USER user
EXPOSE 8501
CMD ["streamlit", "run", "app.py", "--server.address=0.0.0.0", "--server.port=8501"]
