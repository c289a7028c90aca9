from pstage.cli import main

main()
