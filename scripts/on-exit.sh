# Sourced: chat_on_exit CMD runs CMD when the calling shell exits, after whatever was registered
# before it (one EXIT trap can hold only one command, so the scripts that start services share
# this list instead of replacing each other's trap).
chat_on_exit() {
    CHAT_EXIT_ACTIONS="${CHAT_EXIT_ACTIONS:-true}; $1"
    # shellcheck disable=SC2064
    trap "$CHAT_EXIT_ACTIONS" EXIT
}
