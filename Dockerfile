# One image for every region: `docker run ... purlgate serve --region usa`.
FROM python:3.11-slim-bookworm

# gnupg: PGP for clients who encrypt (python-gnupg drives the real gpg binary).
RUN apt-get update \
 && apt-get install -y --no-install-recommends gnupg \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --home-dir /var/lib/purlgate --create-home purlgate

WORKDIR /opt/purlgate
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install --no-cache-dir .

# Config and state live outside the image: mount regions.toml and a data volume.
# Relative data_dir paths in regions.toml resolve against the working directory.
USER purlgate
WORKDIR /var/lib/purlgate
VOLUME ["/var/lib/purlgate"]
ENTRYPOINT ["purlgate"]
CMD ["check-config"]
