FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
WORKDIR /app
COPY pyproject.toml ./
COPY retrieval ./retrieval
COPY webapp ./webapp
RUN pip install --no-cache-dir .
COPY manage.py ./
COPY templates ./templates
COPY static ./static
RUN useradd --create-home simili && mkdir -p /data && chown simili /data
USER simili
EXPOSE 8000
