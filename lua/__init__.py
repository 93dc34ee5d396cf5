# Makes lua/ importable as gateway.lua so the scripts ship inside the package.
