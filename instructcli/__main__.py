from instructcli.cli import main

main()
