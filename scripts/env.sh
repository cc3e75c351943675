# Sourced by the scripts: put pip's cmake (>= 3.26, which knows nvcc's C++20 flags; Debian's 3.25
# does not) and ninja first on PATH, whether or not the Python version manager made shims for them.
for mod in cmake ninja; do
  dir=$(python3 -c "import $mod, os; print(getattr($mod, 'CMAKE_BIN_DIR', None) or $mod.BIN_DIR)" 2>/dev/null) &&
    [ -d "$dir" ] && PATH="$dir:$PATH"
done
export PATH
