from fashionrec_cli.main import app

app()
